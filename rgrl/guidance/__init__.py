"""Reward guidance estimators (EntRGi, APS, expectation) behind one interface."""

from rgrl.guidance.estimators import (
    GUIDANCE_METHODS,
    GuidanceConfig,
    GuidanceStats,
    RewardGuidance,
    entropy_weight,
    mixed_embeddings,
)

__all__ = [
    "GUIDANCE_METHODS",
    "GuidanceConfig",
    "GuidanceStats",
    "RewardGuidance",
    "entropy_weight",
    "mixed_embeddings",
]
