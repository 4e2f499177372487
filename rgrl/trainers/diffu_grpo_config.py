"""Configuration of the diffu-GRPO baseline (d1, arXiv 2504.12216; docs/design.md §5.2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rgrl.trainers.config import MaskedDiffusionConfig

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclass
class DiffuGRPOConfig(MaskedDiffusionConfig):
    """`GRPOConfig` for diffu-GRPO: PPO-clipped policy gradient with d1's one-step log-prob estimator.

    Defaults that differ from GRPOConfig's, following d1:
        p_mask_prompt: 0.15 (the RGRL paper's baselines used 0.3; set it in the recipe).
        scale_rewards: "none" — advantages are reward minus group mean, not divided by the std.
        loss_type: "grpo" — per-sequence token mean, then batch mean ("bnpo", "dr_grpo", "dapo" as in TRL).
        use_bias_correction_kl: False — the plain k3 KL estimator of d1.
    The same prompt mask is used for the old, reference and current log-probs of an inner iteration.
    """

    p_mask_prompt: float = field(default=0.15, metadata={"help": "Probability of masking each prompt token."})
    scale_rewards: str = field(default="none", metadata={"help": "none, group or batch std scaling of advantages."})
    loss_type: str = field(default="grpo", metadata={"help": "grpo, bnpo, dr_grpo or dapo loss normalisation."})
    use_bias_correction_kl: bool = field(default=False, metadata={"help": "Multiply the k3 KL by the ratio."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"diffu-GRPO supports loss_type {LOSS_TYPES}, got {self.loss_type!r}.")
