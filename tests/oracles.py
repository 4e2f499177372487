"""Naive references for the lean vocabulary code, written the direct way (full sort, autograd, torch.optim.Adam).

The production code must agree with these: the same tokens for the same uniforms, the same φ within fp tolerance.
"""

import math

import torch


def filter_logits(logits, top_p=None, top_k=None):
    """Top-p then top-k over the fully sorted vocabulary; dropped entries become -inf. [N, V] -> [N, V]."""
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -math.inf)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits


def filtered_probs(logits, temperature, top_p=None, top_k=None):
    """The distribution tokens are drawn from: softmax(filter(logits / τ)) [N, V]; τ = 0 leaves logits unscaled."""
    scaled = logits / temperature if temperature > 0 else logits
    return filter_logits(scaled, top_p, top_k).softmax(dim=-1)


def sample(logits, temperature, top_p, top_k, uniform):
    """Inverse-CDF draw with one uniform per row, over the kept tokens by decreasing probability (over the
    vocabulary in id order when nothing is filtered); uniform None is greedy. -> ids [N]."""
    probs = filtered_probs(logits, temperature, top_p, top_k)
    if uniform is None:
        return probs.argmax(dim=-1)
    filtering = (top_p is not None and top_p < 1.0) or (top_k is not None and 0 < top_k < logits.shape[-1])
    order = probs.sort(dim=-1, descending=True).indices if filtering else torch.arange(probs.shape[-1]).expand_as(probs)
    cdf = probs.gather(-1, order).cumsum(dim=-1)
    index = (cdf < uniform.unsqueeze(-1) * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def guided_logits(phi, matrix, reward, method, steps, lr, temperature, top_p, top_k, generator):
    """The paper's guidance written out: torch.optim.Adam on φ [N, V], autograd through softmax(φ/τ) @ Ê, the hard
    sample mixed in by a straight-through term with w = H(softmax φ)/log V (entrgi), 1 (aps) or 0 (expectation).
    `reward(embeds [N, d], phi) -> [B]`. One uniform per row and step from `generator`."""
    phi = phi.clone().requires_grad_(True)
    adam = torch.optim.Adam([phi], lr=lr)
    for _ in range(steps):
        adam.zero_grad()
        scaled = phi / temperature if temperature > 0 else phi
        soft = scaled.softmax(-1) @ matrix
        uniform = torch.rand(phi.shape[0], generator=generator) if temperature > 0 else None
        hard = matrix[sample(phi.detach(), temperature, top_p, top_k, uniform)]
        if method == "entrgi":
            p = phi.detach().softmax(-1)
            support = torch.isfinite(phi.detach()).sum(-1).clamp(min=2).float()
            w = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1) / support.log()
        else:
            w = torch.full((phi.shape[0],), 1.0 if method == "aps" else 0.0)
        embeds = soft + (w[:, None] * (hard - soft)).detach()
        (-reward(embeds, phi).sum()).backward()
        adam.step()
    return phi.detach()
