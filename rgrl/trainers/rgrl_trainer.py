"""RGRL: reward-guided rollouts of the current policy, then a likelihood learner on them (docs/design.md §5.1).

Per generation round each process samples K completions per prompt with reward guidance (EntRGi or APS) from
the current LoRA policy, scores them with the reward functions (logged, and used by the optional weightings),
and the learner maximises

    ℓ_i  = Σ_t w_it · log p_θ(y_it | noised prompt, masked completion) / |y_i|
    loss = −(1/N) Σ_i a_i · ℓ_i          (the micro-batch's N completions)

with token weights w from the likelihood estimator (1 for the one-step estimator) and sample weights a (1 for the
paper's uniform version). `loss_normalizer: num_generations` divides by K instead of N, the reference's literal
scale (docs/design.md §8.7). Evaluation rollouts are unguided (docs/design.md §5.3).
"""

from __future__ import annotations

import torch

from rgrl.trainers.base import MaskedDiffusionTrainer
from rgrl.trainers.likelihood import sequence_log_likelihood
from rgrl.trainers.rgrl_config import RGRLConfig


def sample_weights(rewards: torch.Tensor, group_size: int, weighting: str, beta: float = 1.0) -> torch.Tensor:
    """Weights of the completions in the loss, mean 1 per group: [N] rewards (NaN = unscorable) -> [N].

    uniform: all 1. softmax: K·softmax(r/β) within each group. best_of_k: K on the group's best, 0 elsewhere.
    Unscorable completions get weight 0 under softmax and best_of_k.
    """
    if weighting == "uniform":
        return torch.ones_like(rewards)
    grouped = rewards.view(-1, group_size).nan_to_num(nan=-torch.inf)
    if weighting == "softmax":
        weights = (grouped / beta).softmax(dim=1)
    elif weighting == "best_of_k":
        weights = torch.zeros_like(grouped).scatter_(1, grouped.argmax(dim=1, keepdim=True), 1.0)
    else:
        raise ValueError(f"Unknown sample weighting {weighting!r}.")
    return (group_size * weights).nan_to_num(nan=0.0).view(-1)


class RGRLTrainer(MaskedDiffusionTrainer):
    """RGRL on TRL's GRPO loop. Arguments as `MaskedDiffusionTrainer`, plus:

    Args:
        guidance: the `rgrl.guidance.RewardGuidance` of training rollouts (its reward model stays replicated on
            every process and is never handed to TRL), or None for unguided online SFT.
    """

    _name = "RGRL"
    _tag_names = ["trl", "rgrl", "masked-diffusion"]
    _paper = {
        "title": "Entropy Aware Reward Guidance for Diffusion Language Model Alignment",
        "id": "2602.05000",
        "citation": "@article{tejaswi2026entrgi,\n"
        "    title   = {Entropy Aware Reward Guidance for Diffusion Language Model Alignment},\n"
        "    author  = {Tejaswi, Atula and Rout, Litu and Caramanis, Constantine and Shakkottai, Sanjay and "
        "Sanghavi, Sujay},\n"
        "    year    = 2026,\n"
        "    eprint  = {arXiv:2602.05000},\n}",
    }
    _signal_key = "sample_weights"

    def __init__(self, model, reward_funcs, args: RGRLConfig, *, guidance=None, **kwargs):
        if not isinstance(args, RGRLConfig):
            raise TypeError(f"RGRLTrainer needs an RGRLConfig, got {type(args).__name__}.")
        self.guidance = guidance
        super().__init__(model, reward_funcs, args, **kwargs)

    def _guidance(self, mode: str):
        return self.guidance if mode == "train" else None

    def _likelihood_estimator(self) -> str:
        return self.args.likelihood_estimator

    def _per_sample_signal(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return sample_weights(rewards, group_size, self.args.sample_weighting, self.args.sample_weighting_beta)

    def _compute_loss(self, model, inputs: dict) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        log_probs = self._log_probs(model, inputs, 0)
        loglik = sequence_log_likelihood(log_probs, self._token_weights(inputs, 0), inputs["completion_mask"])
        if self.args.loss_normalizer == "num_generations":  # the reference's literal loss: Σ over the micro-batch / K
            normalizer = self.num_generations if mode == "train" else self.num_generations_eval
        else:
            normalizer = len(loglik)
        loss = -(inputs["sample_weights"] * loglik).sum() / normalizer
        self._log_world_means(mode, {"learner/loglik": loglik.detach().mean().item()})
        return loss / self._accumulation_steps()
