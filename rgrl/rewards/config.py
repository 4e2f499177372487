"""The recipe section that names a reward model, and the vocabulary bridge built for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rgrl.models.loading import resolve_checkpoint
from rgrl.rewards.bridge import BridgeFallback, VocabBridge
from rgrl.rewards.reward_model import RewardModel


@dataclass
class RewardModelConfig:
    """A sequence-classification reward model (one label) and how guidance bridges the dLLM vocabulary to it."""

    path: str  # local model folder, Hub id 'org/name', or tiny:/toy: name
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # weights' dtype
    max_length: int = 4096  # longer RM inputs keep their end
    attn_implementation: str | None = "sdpa"  # sdpa, eager, flash_attention_2 (None: transformers' choice)
    trust_remote_code: bool = False  # run the checkpoint's own modeling code
    bridge_fallback: BridgeFallback = "eos"  # embedding of dLLM tokens the RM vocabulary lacks: eos | zero
    bridge_split: bool = True  # a dLLM token the RM writes as several tokens maps to the mean of their embeddings

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}.")

    def check_paths(self) -> None:
        resolve_checkpoint(self.path)

    def load(self, device: str | torch.device | None = None) -> RewardModel:
        return RewardModel.from_pretrained(self.path, dtype=self.dtype, device=device,
                                           trust_remote_code=self.trust_remote_code, max_length=self.max_length,
                                           attn_implementation=self.attn_implementation)

    def bridge(self, dllm_tokenizer, num_rows: int, reward_model: RewardModel) -> VocabBridge:
        """The dLLM → RM vocabulary bridge for a dLLM with `num_rows` logit rows."""
        return VocabBridge(dllm_tokenizer, reward_model.tokenizer, num_rows=num_rows, fallback=self.bridge_fallback,
                           split=self.bridge_split)
