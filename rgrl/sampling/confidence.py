"""Confidence rules that rank masked positions for revealing (docs/design.md §2). Higher = revealed earlier.

All rules take, at N masked positions, the distribution the token was drawn from (`probs`, tempered and
top-p/top-k filtered, [N, V]), the raw logits ([N, V]) and the drawn ids ([N]); they return [N].
"""

from __future__ import annotations

import torch

CONFIDENCE_RULES = ("entropy", "maskgit_plus", "topk_margin", "low_confidence", "random")


def confidence(
    rule: str,
    probs: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if rule == "entropy":  # negative entropy of the sampling distribution (the paper's choice)
        return torch.special.xlogy(probs, probs).sum(dim=-1)
    if rule == "maskgit_plus":  # probability of the drawn token
        return probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if rule == "topk_margin":  # top-1 minus top-2 probability
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if rule == "low_confidence":  # LLaDA: probability of the drawn token under softmax(logits), untempered
        return logits.float().softmax(dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if rule == "random":
        return torch.rand(ids.shape, generator=generator, device=ids.device)
    raise ValueError(f"Unknown confidence rule {rule!r}; expected one of {CONFIDENCE_RULES}.")
