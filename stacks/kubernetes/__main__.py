"""`pulumi up` entry point of the Kubernetes stack (see stacks/README.md)."""

import sys
from pathlib import Path

# Pulumi runs this file from stacks/kubernetes; the stack's modules live in the `stacks`
# package (whose `stacks.kubernetes` does not shadow the `kubernetes` client package).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stacks.errors import StackConfigError
from stacks.kubernetes.program import build, export

try:
    export(build())
except StackConfigError as error:
    raise SystemExit(f"servegrid-k8s: {error}") from None
