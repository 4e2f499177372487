"""Reward functions in TRL's calling convention: f(prompts=[...], completions=[...], **kwargs) -> list[float].

Recipes name them as "package.module:function"; `RewardModelFunction` turns a reward model into one.
"""

from __future__ import annotations

import importlib

from rgrl.rewards.reward_model import RewardModel


def import_function(spec: str):
    """Import "package.module:function" (a clear error names what is missing)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"A function must be named 'package.module:function', got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"Cannot import module {module_name!r} for reward function {spec!r}: {error}") from None
    if not hasattr(module, attribute):
        raise ImportError(f"Module {module_name!r} has no function {attribute!r} (from {spec!r}).")
    return getattr(module, attribute)


def _completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return completion[-1]["content"]
    return completion


def reward_name(path: str) -> str:
    """The metric name of a reward model given by name: "org/Model-1B" -> "Model-1B", "toy:rm" -> "rm"."""
    return path.rstrip("/").split("/")[-1].split(":")[-1]


class RewardModelFunction:
    """A reward model as a TRL reward function; its `__name__` names the `rewards/<name>/…` metrics, `path` is the
    name it was loaded from (None when built from a loaded model)."""

    def __init__(self, reward_model: RewardModel, name: str, batch_size: int = 8, path: str | None = None):
        self.reward_model, self.__name__, self.batch_size, self.path = reward_model, name, batch_size, path

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        texts = [_completion_text(c) for c in completions]
        return self.reward_model.score(prompts, texts, batch_size=self.batch_size).tolist()
