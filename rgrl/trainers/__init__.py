"""RGRL and diffu-GRPO trainers for masked diffusion LMs, on TRL's GRPO loop."""

from rgrl.trainers.base import MaskedDiffusionTrainer
from rgrl.trainers.callbacks import MetricsFileCallback
from rgrl.trainers.config import MaskedDiffusionConfig
from rgrl.trainers.diffu_grpo_config import DiffuGRPOConfig
from rgrl.trainers.diffu_grpo_trainer import DiffuGRPOTrainer, group_advantages
from rgrl.trainers.likelihood import completion_log_probs, draw_noise, sequence_log_likelihood, token_weights
from rgrl.trainers.rgrl_config import RGRLConfig
from rgrl.trainers.rgrl_trainer import RGRLTrainer, sample_weights

__all__ = [
    "DiffuGRPOConfig",
    "DiffuGRPOTrainer",
    "MaskedDiffusionConfig",
    "MaskedDiffusionTrainer",
    "MetricsFileCallback",
    "RGRLConfig",
    "RGRLTrainer",
    "completion_log_probs",
    "draw_noise",
    "group_advantages",
    "sample_weights",
    "sequence_log_likelihood",
    "token_weights",
]
