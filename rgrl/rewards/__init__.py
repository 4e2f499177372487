"""Reward models for guidance and scoring: the frozen RM wrapper, its chat template, and the vocabulary bridge.

`RewardModel.score` is the discrete, reported reward; `RewardModel.embedding_scorer` is the differentiable path
that guidance calls with response embeddings built from `VocabBridge.embedding_matrix`.
"""

from rgrl.rewards.bridge import BridgeCoverage, VocabBridge
from rgrl.rewards.config import RewardModelConfig
from rgrl.rewards.functions import RewardModelFunction, import_function, reward_name
from rgrl.rewards.reward_model import EmbeddingScorer, RewardModel
from rgrl.rewards.template import RESPONSE_PLACEHOLDER, RewardTemplate, TemplateError, as_messages

__all__ = [
    "RESPONSE_PLACEHOLDER",
    "BridgeCoverage",
    "EmbeddingScorer",
    "RewardModel",
    "RewardModelConfig",
    "RewardModelFunction",
    "RewardTemplate",
    "TemplateError",
    "VocabBridge",
    "as_messages",
    "import_function",
    "reward_name",
]
