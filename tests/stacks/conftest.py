"""The stacks are plain Python packages under the repository root."""

import sys

from tests.stacks.harness import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
