"""``python -m servegrid.frontend``: the OpenAI frontend and the processor in one process.

Workers are found through discovery (``ETCD_ENDPOINTS`` in a cluster).
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m servegrid.frontend [--http-port 8000] [--http-host 0.0.0.0]
       [--router-mode random|round-robin|kv] [--model DIR] [--max-model-len N] [--namespace NS]
Any other --key VALUE is the config key of that name (see configs/agg.yaml); with
--router-mode kv also --overlap-score-weight, --router-temperature, --use-kv-events,
--router-ttl and --block-size (see servegrid/kv_router/config.py)."""


def main() -> None:
    from servegrid.components.frontend import Frontend
    from servegrid.components.launch import launch
    from servegrid.components.processor import Processor

    launch([Processor, Frontend], sys.argv[1:], USAGE)


if __name__ == "__main__":
    main()
