"""Prompt datasets: every source's processing on small local copies with the real schemas (built in tmp_path),
checked against direct computations written the way the reference code does them."""

import json
import logging

import datasets
import pytest
from datasets.exceptions import DatasetNotFoundError

from rgrl.data import PROMPT_SOURCES, PromptDataConfig, load_prompts, resolve_source
from rgrl.recipe import RecipeError, build_dataclass


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def texts(dataset):
    """The user text of every prompt, checking the conversational format on the way."""
    out = []
    for prompt in dataset["prompt"]:
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        out.append(prompt[0]["content"])
    return out


def messages(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": role, "content": text} for role, text in zip(roles, turns)]


# --- Records with the real schemas (rgrl/data/sources.py) --------------------------------------------------


def wildchat_records():
    """Tulu 3 preference rows; some prompts repeat (exactly, or up to surrounding whitespace), one is blank."""
    records = []
    for i in range(30):
        prompt = f"Write a poem about topic {i % 22}. Use exactly {i % 22 + 2} lines."
        if i == 25:
            prompt = "  " + prompt + "\n"  # same text as row 3 once stripped
        if i == 29:
            prompt = "   \n"
        records.append(
            {
                "id": f"wildchat-if-{i}",
                "prompt": prompt,
                "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "bad"}],
                "source": "wildchat_if",
            }
        )
    return records


def lmsys_records():
    languages = ["English", "German", "English", None, "English", "Spanish"]
    return [
        {
            "conversation_id": f"c{i}",
            "model": "vicuna-13b",
            "conversation": messages(f"first question {i % 17}", f"answer {i}", f"follow-up {i}", "ok"),
            "turn": 2,
            "language": languages[i % len(languages)],
            "redacted": False,
        }
        for i in range(60)
    ]


def rm_bench_records():
    return [
        {"id": i, "prompt": f"RM-Bench prompt {i}", "chosen": ["a", "b", "c"], "rejected": ["d", "e", "f"],
         "domain": "chat"}
        for i in range(100)
    ]


def judgebench_records(model):
    return [
        {
            "pair_id": f"{model}-{i}",
            "original_id": str(i),
            "source": "mmlu-pro-math",
            "question": f"{model} question {i}",
            "response_model": model,
            "response_A": "A",
            "response_B": "B",
            "label": "A>B",
        }
        for i in range(90)
    ]


def reward_bench_2_records():
    return [
        {"id": str(i), "prompt": f"RB2 prompt {i}", "chosen": ["c"], "rejected": ["r1", "r2", "r3"], "num_correct": 1,
         "num_incorrect": 3, "total_completions": 4, "models": ["m"], "subset": "Focus"}
        for i in range(80)
    ]


# --- Training sources --------------------------------------------------------------------------------------


def test_wildchat_if_matches_reference_procedure(tmp_path, caplog):
    path = write_jsonl(tmp_path / "wildchat.jsonl", wildchat_records())
    with caplog.at_level(logging.INFO, logger="rgrl.data.prompts"):
        prompts = load_prompts(PromptDataConfig(source="wildchat_if", path=str(path)))

    # Reference: shuffle the raw rows with seed 42, strip, keep the first occurrence of each non-empty text.
    expected, seen = [], set()
    for row in datasets.Dataset.from_list(wildchat_records()).shuffle(seed=42):
        text = row["prompt"].strip()
        if text and text not in seen:
            seen.add(text)
            expected.append(text)
    assert texts(prompts) == expected
    assert len(expected) == 22
    assert all(i.startswith("wildchat_if:") for i in prompts["id"])
    assert "skipped 1 empty or whitespace-only prompts" in caplog.text
    assert "skipped 7 repeated prompts" in caplog.text
    assert "22 usable training prompts, fewer than num_prompts=20000; using all 22" in caplog.text


def test_wildchat_if_can_read_the_last_user_turn_of_chosen(tmp_path):
    records = wildchat_records()
    for r in records:
        r["chosen"] = [{"role": "user", "content": "earlier turn"}, {"role": "assistant", "content": "x"}] + r["chosen"]
    path = write_jsonl(tmp_path / "wildchat.jsonl", records)
    from_prompt = load_prompts(PromptDataConfig(source="wildchat_if", path=str(path)))
    from_chosen = load_prompts(PromptDataConfig(source="wildchat_if", path=str(path), field="chosen"))
    assert texts(from_chosen) == texts(from_prompt)


def test_lmsys_english_first_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "lmsys.jsonl", lmsys_records())
    prompts = load_prompts(PromptDataConfig(source="lmsys", path=str(path), num_prompts=12))

    # Reference: filter English, shuffle with seed 42, take 12 rows, first message of the conversation. No dedup.
    ref = datasets.Dataset.from_list(lmsys_records()).filter(lambda r: r["language"] == "English").shuffle(seed=42)
    expected = [ref[i]["conversation"][0]["content"] for i in range(12)]
    assert texts(prompts) == expected
    assert all(t.startswith("first question") for t in expected)
    assert len(set(expected)) < len(expected)  # repeats kept: lmsys is not deduplicated
    rows = [int(i.split(":")[1]) for i in prompts["id"]]
    assert all(lmsys_records()[r]["language"] == "English" for r in rows)


def test_lmsys_other_language(tmp_path):
    path = write_jsonl(tmp_path / "lmsys.jsonl", lmsys_records())
    prompts = load_prompts(PromptDataConfig(source="lmsys", path=str(path), language="German"))
    rows = [int(i.split(":")[1]) for i in prompts["id"]]
    assert len(rows) == 10 and all(lmsys_records()[r]["language"] == "German" for r in rows)


def test_hub_messages_field_takes_the_last_user_turn(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages(f"q{i}", "a", f"last {i}")} for i in range(5)])
    prompts = load_prompts(PromptDataConfig(source="local", path=str(path), field="messages"))
    assert sorted(texts(prompts)) == [f"last {i}" for i in range(5)]
    first = load_prompts(PromptDataConfig(source="local", path=str(path), field="messages", turn="first"))
    assert sorted(texts(first)) == [f"q{i}" for i in range(5)]


# --- Benchmarks: a different subset per seed -------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, records, field, suffix",
    [
        ("rm_bench", rm_bench_records(), "prompt", ".json"),
        ("judgebench", judgebench_records("gpt"), "question", ".jsonl"),
        ("reward_bench_2", reward_bench_2_records(), "prompt", ".parquet"),
    ],
)
def test_benchmark_subsets_per_seed(tmp_path, source, records, field, suffix):
    path = tmp_path / f"{source}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        write_jsonl(path, records)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    config = PromptDataConfig(source=source, path=str(path))

    subsets = {seed: texts(load_prompts(config, seed=seed)) for seed in (1, 2, 3)}
    for seed, subset in subsets.items():
        # Reference: load_dataset(...).shuffle(seed=seed).select(range(64))[field]
        assert subset == datasets.Dataset.from_list(records).shuffle(seed=seed).select(range(64))[field][:]
    assert len({tuple(s) for s in subsets.values()}) == 3
    assert texts(load_prompts(config, seed=2)) == subsets[2]


def test_judgebench_folder_uses_the_gpt_split(tmp_path):
    """A clone of the Hub repo: JSONL files per split, declared in the README."""
    folder = tmp_path / "JudgeBench"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "gpt-00000-of-00001.jsonl", judgebench_records("gpt"))
    write_jsonl(folder / "data" / "claude-00000-of-00001.jsonl", judgebench_records("claude"))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: gpt\n    path: data/gpt-*\n"
        "  - split: claude\n    path: data/claude-*\n---\n"
    )
    prompts = load_prompts(PromptDataConfig(source="judgebench", path=str(folder)), seed=1)
    assert len(prompts) == 64 and all(t.startswith("gpt question") for t in texts(prompts))
    claude = load_prompts(PromptDataConfig(source="judgebench", path=str(folder), split="claude"), seed=1)
    assert all(t.startswith("claude question") for t in texts(claude))


# --- Shuffling and the held-out split ---------------------------------------------------------------------------


def test_shuffle_is_deterministic_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"prompt {i}"} for i in range(200)])
    config = PromptDataConfig(source="local", path=str(path), field="text", num_prompts=50)
    first, again = texts(load_prompts(config)), texts(load_prompts(config))
    assert first == again
    assert texts(load_prompts(config, seed=42)) == first  # config.seed is 42
    other = texts(load_prompts(config, seed=7))
    assert other != first
    seeded = PromptDataConfig(source="local", path=str(path), field="text", num_prompts=50, seed=7)
    assert texts(load_prompts(seeded)) == other


def test_held_out_prompts_are_disjoint_and_stable(tmp_path):
    # Many repeated texts and no dedup: held-out and training prompts must still differ by text.
    records = [{"text": f"prompt {i % 40}"} for i in range(300)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    config = PromptDataConfig(source="local", path=str(path), field="text", num_prompts=100, num_eval_prompts=10)
    train, held_out = texts(load_prompts(config)), texts(load_prompts(config, split="eval"))

    assert len(train) == 100 and len(held_out) == 10 and len(set(held_out)) == 10
    assert not set(train) & set(held_out)
    order = datasets.Dataset.from_list(records).shuffle(seed=42)["text"][:]
    assert held_out == list(dict.fromkeys(order))[:10]  # the first 10 distinct texts in shuffled order
    assert train == [t for t in order if t not in held_out][:100]
    bigger = PromptDataConfig(source="local", path=str(path), field="text", num_prompts=150, num_eval_prompts=10)
    assert texts(load_prompts(bigger, split="eval")) == held_out


def test_held_out_from_a_small_pool(tmp_path, caplog):
    path = write_jsonl(tmp_path / "wildchat.jsonl", wildchat_records())
    config = PromptDataConfig(source="wildchat_if", path=str(path), num_eval_prompts=5)
    train, held_out = texts(load_prompts(config)), texts(load_prompts(config, split="eval"))
    no_eval = texts(load_prompts(PromptDataConfig(source="wildchat_if", path=str(path))))
    assert held_out == no_eval[:5] and train == no_eval[5:]
    with pytest.raises(ValueError, match="only 22 distinct prompts, fewer than num_eval_prompts=40"):
        load_prompts(PromptDataConfig(source="wildchat_if", path=str(path), num_eval_prompts=40), split="eval")
    with pytest.raises(ValueError, match="no training prompts left after holding out 22"):
        load_prompts(PromptDataConfig(source="wildchat_if", path=str(path), num_eval_prompts=22))


# --- Local formats ----------------------------------------------------------------------------------------------


def test_local_formats_agree(tmp_path):
    records = [{"prompt": f"local prompt {i}", "extra": i} for i in range(20)]
    table = datasets.Dataset.from_list(records)
    write_jsonl(tmp_path / "p.jsonl", records)
    (tmp_path / "p.json").write_text(json.dumps(records))
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(tmp_path / "saved_dict"))

    def load(name, **kw):
        return texts(load_prompts(PromptDataConfig(source="local", path=str(tmp_path / name), field="prompt", **kw)))

    expected = table.shuffle(seed=42)["prompt"][:]
    for name in ("p.jsonl", "p.json", "p.parquet", "saved"):
        assert load(name) == expected, name
    assert load("saved_dict", split="train") == expected
    assert sorted(load("saved_dict", split="test")) == [f"local prompt {i}" for i in range(3)]
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with `split`"):
        load("saved_dict")
    with pytest.raises(ValueError, match="no split 'valid'"):
        load("saved_dict", split="valid")
    with pytest.raises(ValueError, match="holds a single table, so `split`"):
        load("p.jsonl", split="train")
    with pytest.raises(ValueError, match="`subset` names a Hub dataset configuration"):
        load("p.parquet", subset="default")


# --- Hub loading (the network call replaced by a stand-in) --------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset; record its calls and serve the records given per dataset id."""
    calls, tables = [], {}

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "revision": revision, **kwargs})
        if isinstance(tables.get(path), Exception):
            raise tables[path]
        return datasets.Dataset.from_list(tables[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


@pytest.mark.parametrize(
    "source, split, records",
    [
        ("wildchat_if", "train", wildchat_records()),
        ("lmsys", "train", lmsys_records()),
        ("rm_bench", "train", rm_bench_records()),
        ("judgebench", "gpt", judgebench_records("gpt")),
        ("reward_bench_2", "test", reward_bench_2_records()),
    ],
)
def test_named_sources_load_the_right_hub_split(fake_hub, source, split, records):
    calls, tables = fake_hub
    hub_id = PROMPT_SOURCES[source].path
    tables[hub_id] = records
    assert len(load_prompts(PromptDataConfig(source=source, revision="abc123"))) > 0
    assert calls == [{"path": hub_id, "name": None, "split": split, "revision": "abc123"}]


def test_hub_source_with_subset_and_messages(fake_hub):
    calls, tables = fake_hub
    tables["org/chats"] = [{"messages": messages(f"q{i}", "a", f"last {i}")} for i in range(6)]
    config = PromptDataConfig(source="hub", path="org/chats", subset="en", split="validation", field="messages")
    prompts = load_prompts(config)
    assert calls[0] == {"path": "org/chats", "name": "en", "split": "validation", "revision": None}
    assert sorted(texts(prompts)) == [f"last {i}" for i in range(6)]
    assert prompts["id"][0].startswith("org/chats:")


def test_gated_dataset_error_says_how_to_get_access(fake_hub):
    _, tables = fake_hub
    tables["lmsys/lmsys-chat-1m"] = DatasetNotFoundError(
        "Dataset 'lmsys/lmsys-chat-1m' is a gated dataset on the Hub. You must be authenticated to access it."
    )
    with pytest.raises(PermissionError, match="huggingface-cli login.*HF_TOKEN") as info:
        load_prompts(PromptDataConfig(source="lmsys"))
    assert "https://huggingface.co/datasets/lmsys/lmsys-chat-1m" in str(info.value)

    tables["org/offline"] = ConnectionError("Couldn't reach 'org/offline' on the Hub")
    with pytest.raises(ConnectionError):  # other failures pass through unchanged
        load_prompts(PromptDataConfig(source="hub", path="org/offline", field="prompt"))


# --- Errors -------------------------------------------------------------------------------------------------------


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown prompt source 'wildchat'. Did you mean 'wildchat_if'?"):
        PromptDataConfig(source="wildchat")
    with pytest.raises(ValueError, match="Did you mean 'reward_bench_2'"):
        PromptDataConfig(source="rewardbench2")
    with pytest.raises(ValueError, match="'local' needs `path` and `field`"):
        PromptDataConfig(source="local", path="x.jsonl")
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        PromptDataConfig(num_prompts=0)
    with pytest.raises(ValueError, match="num_eval_prompts must be >= 0"):
        PromptDataConfig(num_eval_prompts=-1)
    with pytest.raises(ValueError, match="turn must be 'first' or 'last'"):
        PromptDataConfig(turn="middle")
    with pytest.raises(ValueError, match="set num_eval_prompts > 0"):
        load_prompts(PromptDataConfig(), split="eval")
    with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
        load_prompts(PromptDataConfig(), split="test")


def test_source_defaults_and_overrides():
    lmsys = resolve_source(PromptDataConfig(source="lmsys"))
    assert (lmsys.path, lmsys.split, lmsys.field, lmsys.turn, lmsys.language) == (
        "lmsys/lmsys-chat-1m", "train", "conversation", "first", "English"
    )
    assert resolve_source(PromptDataConfig(source="wildchat_if")).dedup is True
    assert resolve_source(PromptDataConfig(source="wildchat_if", dedup=False, num_prompts=5)).num_prompts == 5


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder at"):
        load_prompts(PromptDataConfig(source="local", path=str(tmp_path / "missing.jsonl"), field="prompt"))
    with pytest.raises(FileNotFoundError, match="no file or folder at"):
        load_prompts(PromptDataConfig(source="lmsys", path=str(tmp_path / "lmsys.parquet")))

    path = write_jsonl(tmp_path / "p.jsonl", [{"promt": "typo", "n": 1}])
    with pytest.raises(ValueError, match=r"no column 'prompt'.*Did you mean 'promt'\? Available columns: promt, n"):
        load_prompts(PromptDataConfig(source="local", path=str(path), field="prompt"))
    with pytest.raises(ValueError, match=r"no column 'language'.*Available columns: promt, n"):
        load_prompts(PromptDataConfig(source="local", path=str(path), field="promt", language="English"))
    with pytest.raises(ValueError, match="Column 'n' holds int values"):
        load_prompts(PromptDataConfig(source="local", path=str(path), field="n"))

    (tmp_path / "p.csv").write_text("prompt\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_prompts(PromptDataConfig(source="local", path=str(tmp_path / "p.csv"), field="prompt"))

    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": " "}, {"prompt": None}])
    with pytest.raises(ValueError, match="no training prompts.$"):
        load_prompts(PromptDataConfig(source="local", path=str(blank), field="prompt"))


def test_recipe_section():
    config = build_dataclass(PromptDataConfig, {"source": "lmsys", "num_prompts": 100, "turn": "last"}, source="r.yaml")
    assert config == PromptDataConfig(source="lmsys", num_prompts=100, turn="last")
    with pytest.raises(RecipeError, match="Did you mean 'wildchat_if'"):
        build_dataclass(PromptDataConfig, {"source": "wildchat"}, source="r.yaml")
    with pytest.raises(RecipeError, match="'turn' must be one of"):
        build_dataclass(PromptDataConfig, {"turn": "middle"}, source="r.yaml")
    with pytest.raises(RecipeError, match="Did you mean 'num_prompts'"):
        build_dataclass(PromptDataConfig, {"num_prompt": 3}, source="r.yaml")
