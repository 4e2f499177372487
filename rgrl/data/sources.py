"""The named prompt sources and what is known about their schemas (docs/design.md §6).

The Hub is not reachable from the machine this was written on, so the column names and types below come from
the datasets' cards and from public code that loads them; where each fact was found is noted.

wildchat_if — `allenai/tulu-3-wildchat-if-on-policy-8b`, one split `train`, 10,792 rows, 10,752 distinct
    prompts (so the paper's "first 20,000" is all of them). Tulu 3 preference format: `id` (str), `prompt`
    (str, the user turn), `chosen` / `rejected` (lists of {"role", "content"} ending with the assistant
    answer to that user turn). Sources: the Tulu 3 preference-mixture cards on the Hub (same feature list);
    the EntRGi/RGRL reference code (github atutej/entrgi-rgrl, dllm/pipelines/rl/grpo/datasets.py), which
    reads `prompt` (falling back to the last user turn of `chosen`), strips it, shuffles with seed 42 and
    drops exact duplicates; atutej/entrgi-rgrl eval/score_wildchat_heldout.py gives the row counts. rgrl
    reads `prompt` too; `field: chosen` takes the last user turn of the conversation instead.
lmsys — `lmsys/lmsys-chat-1m` (gated: accept the terms on its Hub page), one split `train`, 1M rows:
    `conversation_id` (str), `model` (str), `conversation` (list of {"content", "role"}), `turn` (int),
    `language` (str, e.g. "English"), `openai_moderation`, `redacted` (bool). Source: the dataset card's
    `dataset_info` (huggingface.co/datasets/lmsys/lmsys-chat-1m and copies of its card). The reference keeps
    `language == "English"`, shuffles with seed 42, takes 20,000 rows and uses the first message of
    `conversation` (always the user's); no dedup.
rm_bench — `THU-KEG/RM-Bench`, one JSON file exposed as split `train`: `id`, `prompt` (str), `chosen` /
    `rejected` (lists of 3 str), `domain` (chat, code, math, safety-refuse, safety-response). Source: its card.
judgebench — `ScalerLab/JudgeBench`, splits `gpt` (350 rows) and `claude` (270), JSONL: `pair_id`,
    `original_id`, `source`, `question` (str), `response_model`, `response_A`, `response_B`, `label`. Sources:
    the Hub file listing and github ScalerLab/JudgeBench README.
reward_bench_2 — `allenai/reward-bench-2`, split `test` (1,865 rows): `id` (str), `prompt` (str), `chosen` /
    `rejected` (lists of str), `num_correct`, `num_incorrect`, `total_completions`, `models`, `subset`,
    `additional_metadata`. Source: the dataset card's `dataset_info`.
toy — the prompts of rgrl's toy world (rgrl/toy/world.py), shipped with the package as a JSONL written by
    `python -m rgrl.toy build`: `prompt` (str), `topic` (str), `word` (str); 300 rows. Set `num_eval_prompts`
    for a held-out split, disjoint from the training prompts.
For the three benchmarks the reference (atutej/entrgi-rgrl main_expts/run.sh, entrgi.py) loads the split,
shuffles it with the run's seed (1, 2, 3) and keeps the first 64 rows, so each seed sees another subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TOY_PROMPTS = Path(__file__).resolve().parent.parent / "toy" / "checkpoints" / "prompts.jsonl"


@dataclass(frozen=True)
class PromptSource:
    """Where a source's prompts live and how they are picked; every field is a default a recipe may override."""

    path: str | None  # Hub dataset id
    split: str | None
    field: str | None  # column with the prompt: a string, or a list of chat messages
    turn: Literal["first", "last"] = "last"  # which user turn, when the field holds chat messages
    language: str | None = None  # keep only rows whose `language` column equals this
    dedup: bool = False  # drop prompts whose text was already taken
    num_prompts: int | None = None  # None: every prompt
    gated: bool = False  # the Hub asks users to accept terms first


PROMPT_SOURCES: dict[str, PromptSource] = {
    "wildchat_if": PromptSource(
        "allenai/tulu-3-wildchat-if-on-policy-8b", "train", "prompt", dedup=True, num_prompts=20_000
    ),
    "lmsys": PromptSource(
        "lmsys/lmsys-chat-1m", "train", "conversation", turn="first", language="English", num_prompts=20_000, gated=True
    ),
    "rm_bench": PromptSource("THU-KEG/RM-Bench", "train", "prompt", num_prompts=64),
    "judgebench": PromptSource("ScalerLab/JudgeBench", "gpt", "question", num_prompts=64),
    "reward_bench_2": PromptSource("allenai/reward-bench-2", "test", "prompt", num_prompts=64),
    "toy": PromptSource(str(TOY_PROMPTS), None, "prompt"),
    # Generic sources: the recipe names the dataset and the column.
    "hub": PromptSource(None, "train", None),
    "local": PromptSource(None, None, None),
}
