"""Prompt datasets: WildChat-IF, lmsys-chat-1m, the test-time benchmarks, any Hub dataset, local files."""

from rgrl.data.prompts import PromptDataConfig, load_prompts, resolve_source
from rgrl.data.sources import PROMPT_SOURCES, PromptSource

__all__ = ["PROMPT_SOURCES", "PromptDataConfig", "PromptSource", "load_prompts", "resolve_source"]
