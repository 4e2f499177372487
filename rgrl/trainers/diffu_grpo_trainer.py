"""diffu-GRPO (d1): GRPO for masked diffusion LMs with the one-step log-prob estimator (docs/design.md §5.2).

Advantages are rewards minus the group mean (std scaling only if asked for). For each rollout, μ = num_iterations
prompt masks are drawn and stored in the batch; inner iteration j scores the old policy (when needed), the
reference (base model, adapter disabled) and the current policy all with mask j. Rollouts are unguided. The loss
is TRL's (PPO-clipped surrogate, k3 KL, `loss_type` normalisation), fed the diffusion log-probs through TRL's
log-prob seam.
"""

from __future__ import annotations

import torch
from trl.trainer.utils import nanstd

from rgrl.trainers.base import MaskedDiffusionTrainer
from rgrl.trainers.diffu_grpo_config import DiffuGRPOConfig
from rgrl.trainers.likelihood import completion_log_probs, sequence_log_likelihood


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
    _scoring = None  # (batch, inner iteration) while `_compute_loss` scores it

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
        """TRL's GRPO loss -- clipped surrogate, k3 KL, `loss_type` normalisation and their metrics -- on the
        diffusion log-probs of inner iteration j: the old and reference log-probs of mask j from the batch, the
        current ones through `_get_per_token_logps_and_entropies` with the same mask."""
        j = self._iteration()
        scored = {**inputs, **{key: inputs[key][:, j] for key in ("old_per_token_logps", "ref_per_token_logps")
                               if key in inputs}}
        self._scoring = (inputs, j)
        try:
            return super()._compute_loss(model, scored)
        finally:
            self._scoring = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):
        """TRL's log-prob seam, answered for the batch `_compute_loss` is scoring: [B, C] log-probs and entropies of
        the completions under `model` with that iteration's noise draw (never TRL's causal path)."""
        if self._scoring is None:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep)
        inputs, j = self._scoring
        log_probs, entropy = completion_log_probs(
            model, self.family, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
            inputs["prompt_noise"][:, j], inputs["completion_noise"][:, j], with_entropy=True)
        loglik = sequence_log_likelihood(log_probs.detach(), self._token_weights(inputs, j), inputs["completion_mask"])
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["learner/loglik"].append(self.accelerator.gather(loglik).mean().item())
        return log_probs, entropy if compute_entropy else None, None
