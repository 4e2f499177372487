"""Categorical-distribution primitives shared by the sampler and the guidance estimators.

All functions take logits [..., V] (usually [N, V]: N rows, one per masked slot) and treat -inf entries as impossible
tokens. Sampling never materialises a filtered copy of the whole vocabulary: top-p/top-k keep a short list of
candidate tokens per row (`nucleus`), and a draw is an inverse-CDF lookup in that list (`draw`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUCLEUS_WIDTH = 64  # candidates first tried per row for top-p without top-k; a wider nucleus falls back to a sort


@dataclass
class Candidates:
    """The tokens a filtered, tempered distribution can draw, per row.

    ids [N, C] and probs [N, C] (float32, each row sums to 1; 0 for the padding entries of rows that keep fewer than C
    tokens). With top-p or top-k the candidates are sorted by decreasing probability; without either they are the
    whole vocabulary in id order (ids is then an [1, V] arange broadcast over the rows).
    """

    ids: torch.Tensor
    probs: torch.Tensor

    def probs_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Probabilities [N] of the tokens `ids` [N] (0 for a token that is no candidate)."""
        return (self.probs * (self.ids == ids.unsqueeze(-1))).sum(dim=-1)


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / τ; τ = 0 means greedy and leaves the logits unscaled (never a division by zero), as does τ = 1."""
    return logits / temperature if temperature not in (0, 1) else logits


def nucleus(
    logits: torch.Tensor, temperature: float, top_p: float | None = None, top_k: int | None = None
) -> Candidates:
    """The tokens kept by top-p (nucleus) then top-k filtering of softmax(logits/τ), in the order of Dream's sampler.

    Top-p keeps the most likely tokens until their probability exceeds `top_p` (always at least one); top-k then
    keeps at most the `top_k` most likely of those. Either may be None (or top_p >= 1, top_k <= 0) to disable it.
    Exact, without sorting the vocabulary: the nucleus is read from the `top_k` (else `NUCLEUS_WIDTH`) largest
    logits; only rows whose nucleus is wider than that are sorted in full, and the list widens to the widest.
    logits: [N, V] -> Candidates with C <= V.
    """
    scaled = scale_logits(logits.float(), temperature)
    vocab = scaled.shape[-1]
    use_top_k = top_k is not None and 0 < top_k < vocab
    use_top_p = top_p is not None and top_p < 1.0
    if not (use_top_k or use_top_p):
        return Candidates(torch.arange(vocab, device=logits.device).unsqueeze(0), scaled.softmax(dim=-1))
    width = top_k if use_top_k else min(NUCLEUS_WIDTH, vocab)
    log_total = scaled.logsumexp(dim=-1, keepdim=True)  # [N, 1], the normaliser over the whole vocabulary
    values, ids = scaled.topk(width, dim=-1)  # [N, C], sorted
    if use_top_p:
        probs = (values - log_total).exp()
        if not use_top_k:  # rows whose nucleus may reach past the candidates: find its true width by a full sort
            wide = probs.sum(dim=-1) <= top_p
            if wide.any():
                sorted_probs = (scaled[wide].sort(dim=-1, descending=True).values - log_total[wide]).exp()
                needed = int(((sorted_probs.cumsum(dim=-1) - sorted_probs) <= top_p).sum(dim=-1).max())
                if needed > width:
                    values, ids = scaled.topk(needed, dim=-1)
                    probs = (values - log_total).exp()
        outside = (probs.cumsum(dim=-1) - probs) > top_p  # the tokens ranked above already exceed top_p
        values = values.masked_fill(outside, -math.inf)
    return Candidates(ids, values.softmax(dim=-1))


def draw(candidates: Candidates, uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row: the index [N] into the candidates.

    uniform [N] in [0, 1): the inverse CDF of the candidates in their order at that point; None: greedy (most likely).
    """
    if uniform is None:
        return candidates.probs.argmax(dim=-1)
    cdf = candidates.probs.cumsum(dim=-1)  # [N, C]
    index = (cdf < uniform.to(cdf.dtype).unsqueeze(-1) * cdf[..., -1:]).sum(dim=-1)
    return index.clamp(max=cdf.shape[-1] - 1)


def uniforms(num_rows: int, temperature: float, generator: torch.Generator | None, device) -> torch.Tensor | None:
    """The randomness of `num_rows` draws: [num_rows] uniforms, or None when τ = 0 (greedy)."""
    if temperature == 0:
        return None
    return torch.rand(num_rows, generator=generator, device=device)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None = None,
    top_k: int | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Candidates]:
    """Draw ids [N] from the filtered, tempered distribution of logits [N, V] with `uniform` [N] (None: greedy).

    Returns (ids [N], the candidates drawn from).
    """
    candidates = nucleus(logits, temperature, top_p, top_k)
    index = draw(candidates, uniform)
    ids = candidates.ids.expand(index.shape[0], -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return ids, candidates


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last dim; -inf logits contribute 0. [..., V] -> [...]."""
    return torch.special.entr(logits.float().softmax(dim=-1)).sum(dim=-1)


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy divided by its maximum, log(#possible tokens), so it lies in [0, 1]. [..., V] -> [...].

    Tokens with -inf logits (the mask token, vocabulary padding rows) are not possible and do not count.
    """
    support = (logits > -math.inf).sum(dim=-1).clamp(min=2)
    return entropy(logits) / support.float().log()
