"""Choosing the next token from a row of logits: greedy, or sampled with temperature and top-p.

Each sequence samples with its own ``torch.Generator``, seeded from the request's ``seed``
(or the engine's seed and the request id), so a seeded request draws the same tokens
whether it runs alone or batched with others.
"""

from __future__ import annotations

from hashlib import blake2b

import torch

_MASK63 = (1 << 63) - 1


def generator_for(seed: int | None, request_id: str, engine_seed: int) -> torch.Generator:
    """A CPU generator: the request's seed, else one derived from the engine's seed and id."""
    if seed is None:
        digest = blake2b(f"{engine_seed}:{request_id}".encode(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed & _MASK63)
    return generator


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token id from ``[vocab]`` logits."""
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    # Sampling runs on the CPU in float32: the draw must not depend on the device's kernels.
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (cumulative - sorted_probs) < top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
