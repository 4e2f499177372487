"""Log-likelihood of completions under a masked diffusion LM, as the learners need it (docs/design.md §5).

A masked diffusion LM has no exact per-token log-likelihood; the learners use one of two estimators, both
computed in one forward pass on the sampler's canvas `[noised prompt | L completion slots]`:

    one_step  d1's estimator: every completion slot is masked and each real prompt token is masked with
              probability `p_mask_prompt`; log p(y_t | noised input) at every completion position.
    elbo      the masked-diffusion ELBO: one mask rate t ~ U(eps, 1) per row, each completion slot masked with
              probability t, the remaining slots showing the completion; only masked positions count, each
              weighted 1/t. Its expectation over t and the masks is the ELBO's per-token sum.

The one-step estimator is the ELBO's t = 1 case, so both share `completion_log_probs` and `token_weights`.
The random draws are made once per rollout (`draw_noise`) and stored in the training batch, so every
forward that must see the same mask (old, reference and current log-probs in diffu-GRPO) reads the same draw.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from rgrl.models.family import DiffusionFamily

Estimator = Literal["one_step", "elbo"]
ESTIMATORS = get_args(Estimator)
MIN_MASK_RATE = 1e-3  # t ~ U(MIN_MASK_RATE, 1): keeps the 1/t weights finite


def draw_noise(
    prompt_mask: torch.Tensor,
    canvas_length: int,
    p_mask_prompt: float,
    estimator: Estimator = "one_step",
    iterations: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The random masks of `iterations` likelihood estimates for B rows.

    Args:
        prompt_mask: [B, P] real (1/True) vs left-pad (0/False) prompt positions.
        canvas_length: L, the number of completion slots the sampler decoded.
    Returns:
        prompt_noise: [B, μ, P] bool, real prompt tokens replaced by the mask token.
        completion_noise: [B, μ, L] bool, completion slots replaced by the mask token (all True for one_step).
        mask_rate: [B, μ] float, t (1 for one_step).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown likelihood estimator {estimator!r}; expected one of {ESTIMATORS}.")
    batch, prompt_length = prompt_mask.shape
    device = prompt_mask.device
    uniform = torch.rand((batch, iterations, prompt_length), device=device, generator=generator)
    prompt_noise = (uniform < p_mask_prompt) & prompt_mask.bool().unsqueeze(1)
    if estimator == "one_step":
        completion_noise = torch.ones((batch, iterations, canvas_length), dtype=torch.bool, device=device)
        mask_rate = torch.ones((batch, iterations), device=device)
    else:
        mask_rate = MIN_MASK_RATE + (1 - MIN_MASK_RATE) * torch.rand((batch, iterations), device=device,
                                                                      generator=generator)
        uniform = torch.rand((batch, iterations, canvas_length), device=device, generator=generator)
        completion_noise = uniform < mask_rate.unsqueeze(-1)
    return {"prompt_noise": prompt_noise, "completion_noise": completion_noise, "mask_rate": mask_rate}


def completion_log_probs(
    model,
    family: DiffusionFamily,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    prompt_noise: torch.Tensor,
    completion_noise: torch.Tensor,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | noised canvas) at each completion position, from one forward.

    Args:
        prompt_ids, prompt_mask: [B, P], left-padded; pads stay hidden by the attention mask.
        completion_ids: [B, C], right-padded with the family's pad id, C <= L.
        prompt_noise: [B, P] bool; completion_noise: [B, L] bool (one draw of `draw_noise`).
    Returns:
        [B, C] float32. Values at padding and (for the ELBO) unmasked positions are meaningless; weigh them
        with `token_weights`. With `with_entropy`, also the entropy [B, C] of each position's distribution (no grad).
    """
    batch = prompt_ids.shape[0]
    canvas_length, length = completion_noise.shape[1], completion_ids.shape[1]
    if length > canvas_length:
        raise ValueError(f"Completions of {length} tokens do not fit the canvas of {canvas_length} slots.")
    clean = completion_ids.new_full((batch, canvas_length), family.pad_token_id)
    clean[:, :length] = completion_ids
    canvas = clean.masked_fill(completion_noise, family.mask_token_id)
    noised_prompt = prompt_ids.masked_fill(prompt_noise & prompt_mask.bool(), family.mask_token_id)
    input_ids = torch.cat([noised_prompt, canvas], dim=1)
    attention_mask = torch.cat([prompt_mask.bool(), torch.ones_like(canvas, dtype=torch.bool)], dim=1)
    logits = family.completion_logits(model, input_ids, attention_mask, canvas_length)[:, :length].float()
    log_probs = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    if not with_entropy:
        return log_probs
    with torch.no_grad():
        entropy = torch.distributions.Categorical(logits=logits).entropy()
    return log_probs, entropy


def token_weights(completion_mask: torch.Tensor, completion_noise: torch.Tensor, mask_rate: torch.Tensor):
    """Weight of each completion position in the estimate: [B, C] mask, [B, L] noise, [B] t -> [B, C] float.

    1 at every real completion token for one_step; 1/t at the masked real tokens (0 elsewhere) for the ELBO.
    """
    length = completion_mask.shape[1]
    return completion_mask.float() * completion_noise[:, :length].float() / mask_rate.unsqueeze(-1)


def sequence_log_likelihood(log_probs: torch.Tensor, weights: torch.Tensor, completion_mask: torch.Tensor):
    """Per-row log-likelihood per completion token: Σ_t w_t·log p_t / |y|, [B, C] -> [B]."""
    return (log_probs * weights).sum(-1) / completion_mask.sum(-1).clamp(min=1)
