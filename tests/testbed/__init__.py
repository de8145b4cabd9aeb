"""servegrid test nodes: systemd-nspawn containers on a private bridge, reached by Ansible over SSH.

Use from Python with `from tests.testbed import Testbed` (repo root on sys.path) or from the
shell with `python -m tests.testbed up 3` in the repo root. See README.md in this directory.
"""

from .config import TestbedConfig
from .core import NodeStatus, Testbed, UpResult
from .node import Node
from .system import TestbedError, preflight_problems

__all__ = [
    "Node",
    "NodeStatus",
    "Testbed",
    "TestbedConfig",
    "TestbedError",
    "UpResult",
    "preflight_problems",
]
