"""Prompt datasets for training and evaluation (docs/design.md §5–§6).

`load_prompts(config, split="train" | "eval", seed=None)` returns a `datasets.Dataset` with TRL's conversational
prompt column and an id:

    prompt: [{"role": "user", "content": str}]        id: "<source>:<row of the raw split>"

Every source goes through the same steps once its raw split is loaded:
  1. keep the rows whose `language` column equals `language` (lmsys: "English");
  2. order the rows by the permutation `Dataset.shuffle(seed=seed)` draws, so a subset equals the
     reference's `load_dataset(...).shuffle(seed).select(range(n))` (after the language filter);
  3. read each prompt from `field`: a string, or the first/last user turn of a list of chat messages; strip
     surrounding whitespace; skip empty prompts (counted, with a warning);
  4. the first `num_eval_prompts` distinct prompts are held out for evaluation; the training prompts are the
     ones after them, minus any text that is held out, minus repeats when `dedup` is on; keep the first
     `num_prompts`.
Rows are read lazily in that order, so 20,000 prompts of lmsys-chat-1m cost ~20,000 conversations, not 1M.

Held-out prompts come first so the evaluation set does not depend on `num_prompts`, and they are disjoint from
the training prompts by text, not only by row. With `num_eval_prompts: 0` (the default) the training prompts
are exactly the paper's. Fewer prompts than `num_prompts`: a warning, and all of them are used (WildChat-IF has
10,752 against the paper's cap of 20,000); fewer than `num_eval_prompts`, or none left for training: an error.

Loading: a Hub id goes through `datasets.load_dataset(path, name=subset, split=split, revision=revision)`, so a
copy in the datasets cache works offline (HF_DATASETS_OFFLINE=1) as is. A local path is a JSONL, JSON or parquet
file, a folder written by `save_to_disk`, or a folder `load_dataset` reads (e.g. a clone of a Hub dataset repo).
Any named source can point `path` at a local copy with the same schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import GatedRepoError

from rgrl.data.sources import PROMPT_SOURCES, PromptSource

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_ROWS_PER_READ = 8192


@dataclass
class PromptDataConfig:
    """Which prompts to use. Fields left unset (None) take the source's defaults (rgrl/data/sources.py)."""

    source: str = "wildchat_if"  # wildchat_if, lmsys, rm_bench, judgebench, reward_bench_2, toy, hub or local
    path: str | None = None  # Hub dataset id or local file/folder; hub and local need it
    subset: str | None = None  # Hub config name
    split: str | None = None  # dataset split (default: the source's)
    field: str | None = None  # column with the prompt: a string or a list of chat messages; hub and local need it
    turn: Literal["first", "last"] | None = None  # which user turn of a list of chat messages
    language: str | None = None  # keep rows whose `language` column equals this (lmsys: English)
    dedup: bool | None = None  # skip prompts whose exact text was already taken (wildchat_if: on)
    num_prompts: int | None = None  # training prompts; None: the source's (20,000 training, 64 benchmarks, else all)
    num_eval_prompts: int = 0  # held-out prompts, disjoint from the training ones (split="eval")
    seed: int = 42  # shuffle seed; load_prompts(seed=s) overrides it (one benchmark subset per seed)
    revision: str | None = None  # Hub branch, tag or commit, to pin the data

    def __post_init__(self):
        if self.source not in PROMPT_SOURCES:
            close = difflib.get_close_matches(self.source, list(PROMPT_SOURCES), n=1, cutoff=0.3)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown prompt source {self.source!r}.{hint} Valid sources: {', '.join(PROMPT_SOURCES)}."
            )
        if self.source in ("hub", "local") and (self.path is None or self.field is None):
            raise ValueError(f"Prompt source {self.source!r} needs `path` and `field` (the column with the prompt).")
        if self.turn not in (None, "first", "last"):
            raise ValueError(f"turn must be 'first' or 'last', got {self.turn!r}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1 (or unset for the source's default), got {self.num_prompts}.")
        if self.num_eval_prompts < 0:
            raise ValueError(f"num_eval_prompts must be >= 0, got {self.num_eval_prompts}.")


def load_prompts(
    config: PromptDataConfig, split: Literal["train", "eval"] = "train", seed: int | None = None
) -> datasets.Dataset:
    """The training prompts, or the `num_eval_prompts` held-out ones, of `config` shuffled with `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if split == "eval" and config.num_eval_prompts == 0:
        raise ValueError("No held-out prompts: set num_eval_prompts > 0 to use split='eval'.")
    source = resolve_source(config)
    label = source.path if config.source in ("hub", "local") else config.source
    raw = _load_raw(source, config, label)
    seed = config.seed if seed is None else seed

    _require_column(raw, source.field, label, "the prompt field")
    candidates = _prompt_texts(raw, _shuffled_rows(raw, source.language, seed, label), source.field, source.turn)
    num_train = 0 if split == "eval" else source.num_prompts
    picked = _pick_prompts(candidates, config.num_eval_prompts, num_train, source.dedup)

    if picked.empty:
        logger.warning(f"{label}: skipped {picked.empty} empty or whitespace-only prompts (among the rows read).")
    if picked.repeated:
        logger.info(f"{label}: skipped {picked.repeated} repeated prompts.")
    if len(picked.held_out) < config.num_eval_prompts:
        raise ValueError(
            f"{label}: only {len(picked.held_out)} distinct prompts, "
            f"fewer than num_eval_prompts={config.num_eval_prompts}."
        )
    chosen = picked.held_out if split == "eval" else picked.train
    if split == "train":
        if not chosen:
            held = f" left after holding out {config.num_eval_prompts}" if config.num_eval_prompts else ""
            raise ValueError(f"{label}: no training prompts{held}.")
        if source.num_prompts is not None and len(chosen) < source.num_prompts:
            logger.warning(
                f"{label}: {len(chosen)} usable training prompts, fewer than num_prompts={source.num_prompts}; "
                f"using all {len(chosen)}."
            )
    logger.info(f"{label}: {len(chosen)} {split} prompts (seed {seed}).")
    return datasets.Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": text}] for _, text in chosen],
            "id": [f"{label}:{row}" for row, _ in chosen],
        }
    )


def resolve_source(config: PromptDataConfig) -> PromptSource:
    """The source's defaults with the fields the config sets."""
    names = ("path", "split", "field", "turn", "language", "dedup", "num_prompts")
    overrides = {name: getattr(config, name) for name in names if getattr(config, name) is not None}
    return dataclasses.replace(PROMPT_SOURCES[config.source], **overrides)


# ---------------------------------------------------------------------------------------------------------------
# After loading: one code path for every source.


def _shuffled_rows(raw: datasets.Dataset, language: str | None, seed: int, label: str) -> np.ndarray:
    """Row numbers of the kept rows in shuffled order: [R] int."""
    rows = np.arange(len(raw))
    if language is not None:
        _require_column(raw, "language", label, f"needed to keep {language!r} rows")
        keep = pc.fill_null(pc.equal(raw.with_format("arrow")["language"], language), False)
        rows = rows[keep.to_numpy(zero_copy_only=False)]
    # Dataset.shuffle(seed=seed) draws this same permutation, so subsets match the reference's shuffle + select.
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def _prompt_texts(raw: datasets.Dataset, rows: np.ndarray, field: str, turn: str) -> Iterator[tuple[int, str]]:
    """(row, stripped prompt text) in the order of `rows`, read a block at a time; empty text for no prompt."""
    column = raw.select_columns([field])
    for start in range(0, len(rows), _ROWS_PER_READ):
        block = rows[start : start + _ROWS_PER_READ].tolist()
        for row, value in zip(block, column[block][field]):
            yield row, _user_text(value, turn, field)


def _user_text(value, turn: str, field: str) -> str:
    """A prompt string, or the first/last user turn of a list of {"role", "content"} messages; "" for none."""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        users = [m["content"] for m in value if m["role"] == "user"]
        value = (users[0] if turn == "first" else users[-1]) if users else None
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    raise ValueError(
        f"Column {field!r} holds {type(value).__name__} values such as {str(value)[:80]!r}; expected a string "
        "or a list of chat messages with 'role' and 'content' (string) keys."
    )


@dataclass
class _Picked:
    held_out: list[tuple[int, str]]
    train: list[tuple[int, str]]
    empty: int  # candidates without a prompt
    repeated: int  # candidates skipped because their text was taken (held out, or trained on with dedup)


def _pick_prompts(
    candidates: Iterator[tuple[int, str]], num_eval: int, num_train: int | None, dedup: bool
) -> _Picked:
    """Hold out the first `num_eval` distinct texts, then take up to `num_train` training prompts (None: all)."""
    picked = _Picked([], [], 0, 0)
    held_texts: set[str] = set()
    train_texts: set[str] = set()
    for row, text in candidates:
        if not text:
            picked.empty += 1
        elif len(picked.held_out) < num_eval:
            if text in held_texts:
                picked.repeated += 1
            else:
                picked.held_out.append((row, text))
                held_texts.add(text)
        elif text in held_texts or (dedup and text in train_texts):
            picked.repeated += 1
        else:
            picked.train.append((row, text))
            train_texts.add(text)
        if len(picked.held_out) == num_eval and len(picked.train) == num_train:
            break
    return picked


def _require_column(raw: datasets.Dataset, name: str, label: str, purpose: str) -> None:
    if name in raw.column_names:
        return
    close = difflib.get_close_matches(name, raw.column_names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{label}: no column {name!r} ({purpose}).{hint} Available columns: {', '.join(raw.column_names)}."
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading the raw split.


def _load_raw(source: PromptSource, config: PromptDataConfig, label: str) -> datasets.Dataset:
    local = Path(source.path).expanduser()
    if local.exists():
        return _load_local(local, source.split, config)
    if config.source == "local" or local.suffix in _FILE_BUILDERS or source.path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{label}: no file or folder at {source.path!r}.")
    return _load_hub(source, config)


def _load_hub(source: PromptSource, config: PromptDataConfig) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, name=config.subset, split=source.split, revision=config.revision)
    except Exception as error:
        if _is_access_error(error):
            raise PermissionError(
                f"The Hub dataset {source.path!r} is gated or needs a login. Accept its terms at "
                f"https://huggingface.co/datasets/{source.path}, then run `huggingface-cli login` "
                "(or `hf auth login`) or set HF_TOKEN."
            ) from error
        if _is_connection_error(error):
            raise ConnectionError(
                f"The Hub dataset {source.path!r} cannot be reached (no network, or HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE is set) and is not in the local datasets cache. Either set `data.path` to a "
                "local copy (a JSONL, JSON or parquet file, a `save_to_disk` folder or a clone of the dataset "
                "repository, with the same columns), or fill the cache where there is internet, with the HF_HOME "
                f"this machine reads: python -c \"import datasets; datasets.load_dataset('{source.path}', "
                f"split='{source.split}')\"."
            ) from None
        raise


def _is_connection_error(error: BaseException | None) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while error is not None:
        if isinstance(error, (ConnectionError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        if "offline" in str(error).lower() and "couldn't" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def check_prompt_source(config: PromptDataConfig) -> None:
    """What can be checked without loading: a local prompt file or folder exists, and a file reads as prompts."""
    path = resolve_source(config).path
    if path is None or not (config.source in ("local", "toy") or path.startswith(("/", ".", "~"))
                            or Path(path).suffix in _FILE_BUILDERS):
        return  # a Hub id
    local = Path(path).expanduser()
    if not local.exists():
        raise FileNotFoundError(f"no file or folder at {path!r}.")
    if local.is_file():
        check_prompt_file(local)


def check_prompt_file(path: str | Path) -> None:
    """Fail naming the file (and line) when a local JSONL/JSON/parquet prompt file is empty or unreadable: bytes
    that are not UTF-8, a line that is not a JSON object, a parquet file without rows."""
    path = Path(path).expanduser()
    fix = "one JSON object per line, UTF-8, e.g. {\"prompt\": \"...\"}"
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_metadata(path).num_rows
        except Exception as error:  # pyarrow's ArrowInvalid and OSError
            raise ValueError(f"{path}: not a readable parquet file ({error}).") from None
        if rows == 0:
            raise ValueError(f"{path}: the file has no rows; it needs one row per prompt.")
        return
    if path.suffix not in (".jsonl", ".json"):
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8 text; "
                         "re-save the file as UTF-8.") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; it needs {fix}.")
    if path.suffix == ".json":
        try:
            json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); the file needs {fix}.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object; the file needs "
                             f"{fix}.")


def _is_access_error(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, GatedRepoError) or (isinstance(error, DatasetNotFoundError) and "gated" in str(error)):
            return True
        if getattr(getattr(error, "response", None), "status_code", None) in (401, 403):
            return True
        error = error.__cause__ or error.__context__
    return False


def _load_local(local: Path, split: str | None, config: PromptDataConfig) -> datasets.Dataset:
    """A file or a saved Dataset is one table; a saved DatasetDict or a dataset folder has named splits."""
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            _no_subset(config, local)
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(str(local), name=config.subset)
    else:
        builder = _FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise ValueError(
                f"{local}: unsupported file type {local.suffix!r}; use .jsonl, .json or .parquet, or a folder "
                "written by Dataset.save_to_disk."
            )
        _no_subset(config, local)
        check_prompt_file(local)
        try:
            loaded = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as error:  # pyarrow's schema errors (e.g. a column of mixed types) name no file
            raise ValueError(f"{local}: datasets cannot read it as {builder} ({type(error).__name__}: {error}).") \
                from None

    if isinstance(loaded, datasets.Dataset):
        if config.split is not None:
            raise ValueError(f"{local} holds a single table, so `split` ({config.split!r}) does not apply; remove it.")
        return loaded
    if split is None:
        if len(loaded) != 1:
            raise ValueError(f"{local} has splits {list(loaded)}; choose one with `split`.")
        split = next(iter(loaded))
    if split not in loaded:
        raise ValueError(f"{local} has no split {split!r}; it has {list(loaded)}.")
    return loaded[split]


def _no_subset(config: PromptDataConfig, local: Path) -> None:
    if config.subset is not None:
        raise ValueError(f"{local}: `subset` names a Hub dataset configuration and does not apply here; remove it.")
