"""Confidence rules that rank masked positions for revealing (docs/design.md §2). Higher = revealed earlier.

All rules see, at N masked positions, the candidates the token was drawn from (`rgrl.distributions.Candidates`: the
tempered, top-p/top-k filtered distribution), the raw logits [N, V] and the drawn ids [N]; they return [N].
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from rgrl.distributions import Candidates

ConfidenceRule = Literal["entropy", "maskgit_plus", "topk_margin", "low_confidence", "random"]
CONFIDENCE_RULES = get_args(ConfidenceRule)


def confidence(
    rule: str,
    candidates: Candidates,
    logits: torch.Tensor,
    ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    probs = candidates.probs
    if rule == "entropy":  # negative entropy of the sampling distribution (the paper's choice)
        return torch.special.xlogy(probs, probs).sum(dim=-1)
    if rule == "maskgit_plus":  # probability of the drawn token
        return candidates.probs_of(ids)
    if rule == "topk_margin":  # top-1 minus top-2 probability (0 stands in for a missing second candidate)
        top2 = torch.nn.functional.pad(probs, (0, 1)).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if rule == "low_confidence":  # LLaDA: probability of the drawn token under softmax(logits), untempered
        logits = logits.float()
        return (logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)).exp()
    if rule == "random":
        return torch.rand(ids.shape, generator=generator, device=ids.device)
    raise ValueError(f"Unknown confidence rule {rule!r}; expected one of {CONFIDENCE_RULES}.")
