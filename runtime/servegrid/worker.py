"""``python -m servegrid.worker``: one engine worker, registered in discovery."""

from __future__ import annotations

import sys

USAGE = """usage: python -m servegrid.worker [--engine mocker|echo|torch|vllm] [--model DIR]
       [--block-size 16] [--max-model-len N] [--speedup-ratio R] [--namespace NS]
Any other --key VALUE is the Worker config key of that name (see configs/agg.yaml)."""


def main() -> None:
    from servegrid.components.launch import launch
    from servegrid.components.worker import Worker

    launch([Worker], sys.argv[1:], USAGE)


if __name__ == "__main__":
    main()
