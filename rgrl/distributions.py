"""Categorical-distribution primitives shared by the sampler and the guidance estimators.

All functions take logits [..., V] (any leading shape) and treat -inf entries as impossible tokens.
"""

from __future__ import annotations

import math

import torch


def filter_logits(logits: torch.Tensor, top_p: float | None = None, top_k: int | None = None) -> torch.Tensor:
    """Nucleus (top-p) then top-k filtering, in the order of Dream's sampler. [..., V] -> [..., V].

    Entries outside the kept set become -inf. Top-p keeps the most likely tokens until their probability
    exceeds `top_p` (always at least one); top-k then keeps at most the `top_k` largest logits. Either may be
    None (or top_p >= 1, top_k <= 0) to disable it.
    """
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already exceed top_p.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from probabilities [..., V] (rows need not be normalised). Returns ids [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat.float(), num_samples=1, generator=generator)
    return draws.reshape(probs.shape[:-1])


def tempered_probs(
    logits: torch.Tensor, temperature: float, top_p: float | None = None, top_k: int | None = None
) -> torch.Tensor:
    """softmax(filter(logits / temperature)) [..., V]; temperature 0 leaves the logits unscaled (greedy use)."""
    if temperature > 0:
        logits = logits / temperature
    return filter_logits(logits, top_p, top_k).softmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ids from `tempered_probs(logits, ...)`; temperature 0 is greedy.

    Returns (ids [...], probs [..., V]) where probs is the filtered, tempered distribution sampled from.
    """
    probs = tempered_probs(logits, temperature, top_p, top_k)
    if temperature > 0:
        return sample_categorical(probs, generator), probs
    return probs.argmax(dim=-1), probs


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last dim; -inf logits contribute 0. [..., V] -> [...]."""
    log_probs = logits.float().log_softmax(dim=-1)
    probs = log_probs.exp()
    return -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(dim=-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum, log(#possible tokens), so it lies in [0, 1]. [..., V] -> [...].

    Tokens with -inf logits (the mask token, vocabulary padding rows) are not possible and do not count.
    """
    support = torch.isfinite(logits).sum(dim=-1).clamp(min=2)
    return entropy(logits) / support.float().log()
