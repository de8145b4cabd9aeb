"""`pulumi up` entry point of the AWS stack (see stacks/README.md)."""

import sys
from pathlib import Path

# Pulumi runs this file from stacks/aws; the stack's modules live in the `stacks` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stacks.aws.program import build, export
from stacks.errors import StackConfigError

try:
    export(build())
except StackConfigError as error:
    # One clear message, not a traceback: Pulumi shows it as the program's error.
    raise SystemExit(f"servegrid-aws: {error}") from None
