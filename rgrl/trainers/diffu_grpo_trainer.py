"""diffu-GRPO (d1): GRPO for masked diffusion LMs with the one-step log-prob estimator (docs/design.md §5.2).

Advantages are rewards minus the group mean (std scaling only if asked for). For each rollout, μ = num_iterations
prompt masks are drawn and stored in the batch; inner iteration j scores the old policy (when needed), the
reference (base model, adapter disabled) and the current policy all with mask j. Rollouts are unguided.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd

from rgrl.trainers.base import MaskedDiffusionTrainer
from rgrl.trainers.diffu_grpo_config import DiffuGRPOConfig
from rgrl.trainers.likelihood import sequence_log_likelihood


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "none") -> torch.Tensor:
    """[N] rewards in groups of `group_size` consecutive rows -> [N] advantages r − mean(group).

    scale: "none" (d1, the default), "group" (÷ group std + 1e-4) or "batch" (÷ std over all rows + 1e-4).
    NaN rewards are left out of the means and get advantage 0.
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale == "group":
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale must be 'none', 'group' or 'batch', got {scale!r}.")
    return advantages.view(-1).nan_to_num(nan=0.0)


def clipped_surrogate(log_probs, old_log_probs, advantages, epsilon_low: float, epsilon_high: float):
    """PPO's per-token loss −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) with ρ = exp(logp − logp_old).

    [B, C] log-probs, [B] advantages -> ([B, C] loss, [B, C] ratio ρ).
    """
    ratio = torch.exp(log_probs - old_log_probs)
    advantages = advantages.unsqueeze(1)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate exp(d) − d − 1 with d = logp_ref − logp (≥ 0, zero when equal)."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


class DiffuGRPOTrainer(MaskedDiffusionTrainer):
    """diffu-GRPO on TRL's GRPO loop; arguments as `MaskedDiffusionTrainer`."""

    _name = "diffu-GRPO"
    _tag_names = ["trl", "rgrl", "diffu-grpo", "masked-diffusion"]
    _paper = {
        "title": "d1: Scaling Reasoning in Diffusion Large Language Models via Reinforcement Learning",
        "id": "2504.12216",
        "citation": "@article{zhao2025d1,\n"
        "    title   = {d1: Scaling Reasoning in Diffusion Large Language Models via Reinforcement Learning},\n"
        "    author  = {Zhao, Siyan and Gupta, Devaansh and Zheng, Qinqing and Grover, Aditya},\n"
        "    year    = 2025,\n"
        "    eprint  = {arXiv:2504.12216},\n}",
    }

    _config_class = DiffuGRPOConfig

    def _per_sample_signal(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_advantages(rewards, group_size, self.args.scale_rewards)

    def _behaviour_log_probs(self, batch: dict, mode: str) -> dict:
        """Old log-probs (when the policy moves before a batch is used up) and reference log-probs: [B, μ, C].

        Both are computed in eval mode (no dropout): the old policy is the one that sampled the rollouts.
        """
        iterations = batch["prompt_noise"].shape[1]
        args = self.args
        need_old = mode == "train" and args.gradient_accumulation_steps % (args.steps_per_generation * iterations) != 0
        if not need_old and self.beta == 0.0:
            return {}

        def each_iteration():
            return torch.stack([self._log_probs(self.model, batch, j) for j in range(iterations)], dim=1)

        out = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if need_old:
                    out["old_per_token_logps"] = each_iteration()
                if self.beta != 0.0:
                    with self.accelerator.unwrap_model(self.model).disable_adapter():
                        out["ref_per_token_logps"] = each_iteration()
        finally:
            self.model.train(was_training)
        return out

    def _iteration(self) -> int:
        """Index j of the inner iteration the current micro-step belongs to (0 in eval)."""
        if not self.model.training:
            return 0
        return (self._step // self.args.steps_per_generation) % self.num_iterations

    def _compute_loss(self, model, inputs: dict) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        j = self._iteration()
        mask = self._token_weights(inputs, j)
        log_probs = self._log_probs(model, inputs, j)
        old = inputs["old_per_token_logps"][:, j] if "old_per_token_logps" in inputs else log_probs.detach()
        per_token, ratio = clipped_surrogate(log_probs, old, inputs["advantages"], self.epsilon_low,
                                             self.epsilon_high)
        metrics = {}
        if self.beta != 0.0:
            kl = k3_kl(log_probs, inputs["ref_per_token_logps"][:, j])
            per_token = per_token + self.beta * (kl * ratio if self.args.use_bias_correction_kl else kl)
            metrics["kl"] = self._masked_world_mean(kl, mask)
        loss = self._aggregate(per_token, mask, inputs)

        advantages = inputs["advantages"].unsqueeze(1)
        low = (ratio < 1 - self.epsilon_low) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = self._masked_world_mean(low.float(), mask)
        metrics["clip_ratio/high_mean"] = self._masked_world_mean(high.float(), mask)
        metrics["clip_ratio/region_mean"] = self._masked_world_mean((low | high).float(), mask)
        loglik = sequence_log_likelihood(log_probs.detach(), mask, inputs["completion_mask"])
        metrics["learner/loglik"] = self.accelerator.gather(loglik).mean().item()
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return loss

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """TRL's loss normalisations (per loss_type) of the [B, C] per-token loss, scaled for accumulation."""
        accumulation = self._accumulation_steps()
        total = (per_token * mask).sum()
        if self.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / accumulation
        if self.loss_type == "bnpo":
            return total / mask.sum().clamp(min=1) / accumulation
        if self.loss_type == "dr_grpo":
            return total / (per_token.shape[0] * self.max_completion_length) / accumulation
        # dapo: tokens of the whole generation batch, rescaled to one accumulation window of this process
        tokens = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
        if self.model.training:
            tokens = tokens * accumulation / self.args.steps_per_generation
        return total / tokens

    def _masked_world_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        totals = torch.stack([(values.detach() * mask).sum(), mask.sum()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).item()
