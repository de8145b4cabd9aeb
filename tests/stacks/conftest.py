"""The stacks are plain Python packages under the repository root."""

import sys
import warnings

from tests.stacks.harness import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# pulumi_aws warns about its own deprecated resources on import; not ours to fix.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pulumi_aws")
