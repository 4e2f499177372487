"""Prompt datasets: WildChat-IF, lmsys-chat-1m, the test-time benchmarks, any Hub dataset, local files."""

from rgrl.data.prompts import PromptDataConfig, check_prompt_file, check_prompt_source, load_prompts, resolve_source
from rgrl.data.sources import PROMPT_SOURCES, PromptSource

__all__ = ["PROMPT_SOURCES", "PromptDataConfig", "PromptSource", "check_prompt_file", "check_prompt_source", "load_prompts", "resolve_source"]
