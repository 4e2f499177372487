"""The denoising loop (schedules, confidence rules, blocks) with a reward-guidance hook."""

from rgrl.sampling.confidence import CONFIDENCE_RULES, confidence
from rgrl.sampling.sampler import DiffusionSampler, GenerationStats, SampleOutput, SamplerConfig, completion_mask
from rgrl.sampling.schedules import SCHEDULES, RevealStep, reveal_counts, reveal_plan

__all__ = [
    "CONFIDENCE_RULES",
    "SCHEDULES",
    "DiffusionSampler",
    "GenerationStats",
    "RevealStep",
    "SampleOutput",
    "SamplerConfig",
    "completion_mask",
    "confidence",
    "reveal_counts",
    "reveal_plan",
]
