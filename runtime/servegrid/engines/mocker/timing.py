"""How long a simulated scheduler step takes.

A step runs every scheduled sequence once: prefilling sequences compute their new prompt
tokens, decoding ones one token each. Roughly what vLLM shows for a ~1B-parameter model on
one H100 with CUDA graphs::

    step_ms = STEP_BASE_MS                          # launch + sampling overhead
            + PREFILL_MS_PER_TOKEN * prefill_tokens # compute-bound: ~33k prompt tokens/s
            + DECODE_MS_PER_SEQ * decode_seqs       # a wider batch costs a little more
            + KV_READ_MS_PER_TOKEN * context_tokens # attention reads every cached token

so one sequence decodes at ~330 tokens/s, 64 sequences of 1k context at ~5.6 ms a step
(~11k tokens/s together), and a 2k-token uncached prompt adds ~60 ms to one step. Cached
prefix tokens cost nothing, which is what makes KV-aware routing visible in benchmarks.
The result is divided by ``speedup-ratio``.
"""

from __future__ import annotations

STEP_BASE_MS = 3.0
PREFILL_MS_PER_TOKEN = 0.03
DECODE_MS_PER_SEQ = 0.02
KV_READ_MS_PER_TOKEN = 0.00002


def step_seconds(
    prefill_tokens: int, decode_seqs: int, context_tokens: int, speedup_ratio: float
) -> float:
    ms = (
        STEP_BASE_MS
        + PREFILL_MS_PER_TOKEN * prefill_tokens
        + DECODE_MS_PER_SEQ * decode_seqs
        + KV_READ_MS_PER_TOKEN * context_tokens
    )
    return ms / (1000.0 * speedup_ratio)
