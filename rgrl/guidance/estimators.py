"""Reward guidance at one denoising step (docs/design.md §3): EntRGi, APS and the expectation estimator.

The dLLM logits φ at the N currently masked positions are optimised for M Adam steps (fresh optimiser every
denoising step, lr η) to raise a differentiable reward model's score. The reward model reads, at each masked
position, a mix of the soft embedding s = softmax(φ/τ) @ Ê and the embedding h = Ê[x] of a hard sample
x ~ top-p/top-k(softmax(φ/τ)):

    e = s + stopgrad(w · (h − s))          forward value (1 − w)·s + w·h, gradient through s only

with w = H(softmax φ)/log V for EntRGi, w = 1 for APS (straight-through) and w = 0 for the expectation
estimator. Ê is the reward model's input-embedding matrix re-indexed into the dLLM vocabulary (VocabBridge).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from rgrl.distributions import normalized_entropy, sample_tokens

GUIDANCE_METHODS = ("entrgi", "aps", "expectation", "none")


@dataclass
class GuidanceConfig:
    """How reward gradients steer sampling. The temperature, top-p and top-k come from the sampler."""

    method: Literal["entrgi", "aps", "expectation", "none"] = "entrgi"
    steps: int = 3  # M: Adam steps on φ per denoising step
    lr: float = 0.5  # η
    # Log the reward of the updated proposals (guidance/reward_after, reward_gain): one extra RM forward per denoising
    # step, about half of guidance's FLOPs at M = 1 (a frozen RM's input backward costs about one forward), a sixth
    # at M = 3 (docs/design.md §3).
    measure_gain: bool = False

    def __post_init__(self):
        if self.method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance method must be one of {GUIDANCE_METHODS}, got {self.method!r}.")
        if self.steps < 1:
            raise ValueError(f"guidance steps (M) must be >= 1, got {self.steps}.")
        if self.lr <= 0:
            raise ValueError(f"guidance lr (η) must be > 0, got {self.lr}.")


def entropy_weight(method: str, logits: torch.Tensor) -> torch.Tensor:
    """Weight w of the hard embedding per position: [N, V] -> [N], no gradient."""
    if method == "entrgi":
        return normalized_entropy(logits.detach())
    if method == "aps":
        return logits.new_ones(logits.shape[0])
    if method == "expectation":
        return logits.new_zeros(logits.shape[0])
    raise ValueError(f"No entropy weight for guidance method {method!r}.")


def mixed_embeddings(
    logits: torch.Tensor,
    embedding_matrix: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reward-model input embeddings at masked positions: e = s + stopgrad(w·(h − s)).

    Args:
        logits: φ [N, V] (requires grad).
        embedding_matrix: Ê [V, d], frozen.
        weight: w [N] in [0, 1].
        temperature: τ; 0 means greedy, as in the sampler: the soft part is softmax(φ) (unscaled) and the hard
            sample is the argmax.
    Returns:
        e [N, d] in Ê's dtype; its gradient w.r.t. φ is the soft path's.
    """
    scaled = logits / temperature if temperature > 0 else logits
    soft = scaled.softmax(dim=-1).to(embedding_matrix.dtype) @ embedding_matrix
    with torch.no_grad():
        hard_ids, _ = sample_tokens(logits.detach(), temperature, top_p, top_k, generator)
        hard = embedding_matrix[hard_ids]
    w = weight.to(soft.dtype).unsqueeze(-1)
    return soft + (w * (hard - soft)).detach()


@dataclass
class GuidanceStats:
    """Running totals over the denoising steps of one generation."""

    steps: int = 0
    entropy_weight_sum: float = 0.0  # mean w of the proposals at each step's first Adam step
    reward_before_sum: float = 0.0  # mean RM score of the proposals before the Adam steps
    reward_after_sum: float = 0.0  # ... and after them (only when measure_gain)
    rm_forward_backward: int = 0
    rm_forward: int = 0
    rm_input_shape: tuple[int, int] = (0, 0)  # [rows, columns] of every RM pass of this generation
    relaxed_positions: int = 0  # Σ over RM forward+backward passes of the masked positions N (rows of φ)
    relaxed_positions_forward: int = 0  # ... over the measure_gain forwards
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list, repr=False)

    def as_metrics(self) -> dict[str, float]:
        n = max(self.steps, 1)
        metrics = {
            "entropy_weight": self.entropy_weight_sum / n,
            "reward_before": self.reward_before_sum / n,
            "rm_forward_backward": float(self.rm_forward_backward),
            "rm_forward": float(self.rm_forward),
            "seconds": self.seconds,
        }
        if self.rm_forward:
            metrics["reward_after"] = self.reward_after_sum / n
            metrics["reward_gain"] = (self.reward_after_sum - self.reward_before_sum) / n
        return metrics


class RewardGuidance:
    """Steers a dLLM's logits at masked positions with a reward model's gradients.

    Args:
        config: the estimator and its optimiser settings.
        reward_model: a `rgrl.rewards.RewardModel` (frozen, differentiable embedding path).
        bridge: a `rgrl.rewards.VocabBridge` from the dLLM vocabulary to the reward model's.
        stop_token_ids: the dLLM tokens that end a response (EOS, end of turn). The reward model reads a response up
            to and including its first stop slot, which stands where its chat template writes the end of turn: in Ê
            every stop token is the RM's end-of-turn embedding, so a one-hot φ scores exactly as the discrete path
            (whose text ends before the stop token and gets the template's end of turn), and the stop slot's logits
            receive reward gradient -- guidance can move where a response ends.
    """

    def __init__(self, config: GuidanceConfig, reward_model, bridge, stop_token_ids: tuple[int, ...]):
        if config.method == "none":
            raise ValueError("RewardGuidance needs a guidance method; 'none' means unguided sampling.")
        if not stop_token_ids:
            raise ValueError("RewardGuidance needs the dLLM's stop token ids (EOS and end of turn).")
        self.config = config
        self.reward_model = reward_model
        self.stop_token_ids = tuple(stop_token_ids)
        embedding_matrix = bridge.embedding_matrix(reward_model.input_embeddings)  # Ê [V, d]
        with torch.no_grad():
            end_of_turn = torch.tensor([reward_model.template.end_of_turn_id], device=embedding_matrix.device)
            embedding_matrix[list(self.stop_token_ids)] = reward_model.input_embeddings(end_of_turn).to(
                embedding_matrix.dtype)
        self.embedding_matrix = embedding_matrix

    def scorer(self, prompts: list, num_slots: int):
        """Reward of response embeddings for these prompts (one per row); build once per generation."""
        return self.reward_model.embedding_scorer(prompts, num_slots=num_slots)

    def response_embeddings(self, tokens: torch.Tensor, masked: torch.Tensor, masked_embeds: torch.Tensor):
        """[B, L] canvas tokens, [B, L] masked flags, [N, d] embeddings at masked slots -> [B, L, d]."""
        revealed = self.embedding_matrix[tokens.clamp(max=self.embedding_matrix.shape[0] - 1)]
        return revealed.masked_scatter(masked.unsqueeze(-1), masked_embeds)

    def first_stop(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids -> (keep [B, L] bool: slots strictly before the first stop token; stop_slot [B] long: the
        first stop token's slot, L when there is none)."""
        is_stop = torch.isin(ids, torch.tensor(self.stop_token_ids, device=ids.device))
        keep = is_stop.long().cumsum(dim=-1) == 0
        return keep, keep.sum(dim=-1)

    def __call__(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        masked: torch.Tensor,
        scorer,
        temperature: float,
        top_p: float | None,
        top_k: int | None,
        generator: torch.Generator | None = None,
        stats: GuidanceStats | None = None,
    ) -> torch.Tensor:
        """Guide one denoising step.

        Args:
            logits: [B, L, V] aligned dLLM logits of the completion slots (fp32; impossible tokens at -inf).
            tokens: [B, L] current canvas of the completion slots (mask id where masked).
            masked: [B, L] bool, the slots still masked.
            scorer: from `self.scorer(prompts, L)`.
            temperature: τ (0: greedy, unscaled logits).
        Returns:
            [B, L, V] logits with the masked slots replaced by the optimised φ (no grad).
        """
        if not masked.any():
            return logits
        start = time.perf_counter()
        config, device = self.config, self.embedding_matrix.device
        tokens, masked = tokens.to(device), masked.to(device)
        phi = logits[masked].detach().to(device=device, dtype=torch.float32).requires_grad_(True)  # [N, V]
        adam = _FreshAdam(phi, lr=config.lr)

        def reward(phi_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Rewards [B] of the current proposals, and the entropy weights [N] used for them."""
            weight = entropy_weight(config.method, phi_now)
            embeds = mixed_embeddings(phi_now, self.embedding_matrix, weight, temperature, top_p, top_k, generator)
            ids = tokens.masked_scatter(masked, phi_now.detach().argmax(dim=-1))
            keep, stop_slot = self.first_stop(ids)
            return scorer(self.response_embeddings(tokens, masked, embeds), keep, stop_slot), weight

        with torch.enable_grad():
            for step in range(config.steps):
                rewards, weight = reward(phi)
                (gradient,) = torch.autograd.grad(-rewards.sum(), phi)
                adam.step(gradient)
                if step == 0 and stats is not None:
                    stats.reward_before_sum += rewards.detach().mean().item()
                    stats.entropy_weight_sum += weight.mean().item()
        if stats is not None:
            stats.steps += 1
            stats.rm_forward_backward += config.steps
            stats.rm_input_shape = scorer.input_shape
            stats.relaxed_positions += config.steps * phi.shape[0]
            if config.measure_gain:
                with torch.no_grad():
                    stats.reward_after_sum += reward(phi)[0].mean().item()
                stats.rm_forward += 1
                stats.relaxed_positions_forward += phi.shape[0]
            stats.seconds += time.perf_counter() - start
        guided = logits.clone()
        guided[masked.to(logits.device)] = phi.detach().to(logits.device, logits.dtype)
        return guided


class _FreshAdam:
    """Adam on one tensor, started from zero state (torch.optim.Adam's update, defaults betas/eps).

    Its first step is the closed form lr·g/(|g| + eps); the moment buffers (each as large as φ) are only
    allocated when a second step follows, which keeps M = 1 (the RGRL rollout setting) at one copy of φ.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.count = 0
        self.first_gradient = None
        self.exp_avg = self.exp_avg_sq = None

    @torch.no_grad()
    def step(self, gradient: torch.Tensor) -> None:
        self.count += 1
        beta1, beta2 = self.betas
        if self.count == 1:
            self.param.sub_(self.lr * gradient / (gradient.abs() + self.eps))
            self.first_gradient = gradient
            return
        if self.exp_avg is None:  # replay step 1 into the moment buffers
            self.exp_avg = (1 - beta1) * self.first_gradient
            self.exp_avg_sq = (1 - beta2) * self.first_gradient.square()
            self.first_gradient = None
        self.exp_avg.mul_(beta1).add_(gradient, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        bias1, bias2 = 1 - beta1**self.count, 1 - beta2**self.count
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)
