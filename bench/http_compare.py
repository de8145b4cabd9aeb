"""The HTTP-layer decision, measured: the hand-written server vs uvicorn on the agg graph.

    python bench/http_compare.py --rounds 5 --requests 5000

Runs ``graph_bench.py`` once per variant per round, alternating (A B, B A, A B...) so that
load from anything else on the machine falls on both alike, and prints per scenario the
median requests/s and server CPU per request of each variant and their ratio. The ratio of
CPU per request is the one that answers "faster at equal CPU"; requests/s also moves with
whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VARIANTS = {"builtin": [], "uvicorn": ["--http-server", "uvicorn"]}


def run_once(variant: str, args: argparse.Namespace) -> dict[str, dict]:
    command = [
        sys.executable, str(BENCH / "graph_bench.py"), "--json",
        "--requests", str(args.requests), "--warmup", str(args.warmup),
        "--scenarios", args.scenarios, *VARIANTS[variant],
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant}: graph_bench failed:\n{out.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["scenario"]: row for row in rows}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--scenarios", default="completions,chat,chat-stream")
    args = parser.parse_args()

    results: dict[str, list[dict[str, dict]]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    for round_no in range(args.rounds):
        for variant in order if round_no % 2 == 0 else order[::-1]:
            results[variant].append(run_once(variant, args))
            print(f"round {round_no + 1}: {variant} done", file=sys.stderr, flush=True)

    print("| scenario | variant | req/s median (runs) | server µs CPU/req median (runs) |")
    print("|---|---|---|---|")
    summary = {}
    for scenario in results["builtin"][0]:
        for variant in VARIANTS:
            rps = [number(r[scenario]["req/s"]) for r in results[variant]]
            cpu = [number(r[scenario]["server µs CPU/req"]) for r in results[variant]]
            summary[(scenario, variant)] = (statistics.median(rps), statistics.median(cpu))
            print(
                f"| {scenario} | {variant} | {statistics.median(rps):,.0f} "
                f"({', '.join(f'{v:,.0f}' for v in rps)}) | {statistics.median(cpu):,.0f} "
                f"({', '.join(f'{v:,.0f}' for v in cpu)}) |"
            )
    print()
    for scenario in results["builtin"][0]:
        rps_b, cpu_b = summary[(scenario, "builtin")]
        rps_u, cpu_u = summary[(scenario, "uvicorn")]
        print(
            f"{scenario}: builtin/uvicorn requests/s {rps_b / rps_u:.2f}x, "
            f"uvicorn/builtin CPU per request {cpu_u / cpu_b:.2f}x"
        )


if __name__ == "__main__":
    main()
