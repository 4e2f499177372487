"""The tiny offline checkpoints: deterministic, ordinary model directories, loadable like the real ones."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from rgrl.toy.__main__ import main as toy_main
from rgrl.toy.tiny import TINY_CHECKPOINTS, build_tiny_checkpoint, tiny_checkpoint


@pytest.mark.parametrize("name", TINY_CHECKPOINTS)
def test_build_is_deterministic(tmp_path, name):
    a, b = build_tiny_checkpoint(name, tmp_path / "a"), build_tiny_checkpoint(name, tmp_path / "b")
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


@pytest.mark.parametrize("name,architecture", [("dream", "DreamModel"), ("llada", "LLaDAModelLM")])
def test_dllms_load_natively_despite_the_hub_auto_map(name, architecture):
    path = tiny_checkpoint(name)
    config = json.loads((path / "config.json").read_text())
    assert "auto_map" in config and config["architectures"] == [architecture]
    model = AutoModel.from_pretrained(path)  # no trust_remote_code: rgrl's registered classes win
    assert type(model).__name__ == architecture and type(model).__module__.startswith("rgrl.models")


def test_tokenizers_carry_the_real_special_tokens_and_templates():
    dream = AutoTokenizer.from_pretrained(tiny_checkpoint("dream"))
    assert (dream.mask_token, dream.eos_token, dream.pad_token) == ("<|mask|>", "<|endoftext|>", "<|endoftext|>")
    assert dream.convert_ids_to_tokens(len(dream) - 1) == "<|mask|>"  # special tokens last, like the real vocab
    llada = AutoTokenizer.from_pretrained(tiny_checkpoint("llada"))
    assert "<|mdm_mask|>" in llada.get_vocab() and "<|eot_id|>" in llada.get_vocab()
    text = llada.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|startoftext|><|start_header_id|>user")


def test_reward_models_share_or_mismatch_the_dream_vocabulary():
    dream = AutoTokenizer.from_pretrained(tiny_checkpoint("dream"))
    shared = AutoTokenizer.from_pretrained(tiny_checkpoint("rm"))
    mismatched = AutoTokenizer.from_pretrained(tiny_checkpoint("rm_mismatched"))
    assert shared.get_vocab() == dream.get_vocab()
    common = set(dream.get_vocab()) & set(mismatched.get_vocab())
    assert sum(dream.get_vocab()[t] == mismatched.get_vocab()[t] for t in common) < 0.05 * len(common)  # other ids
    assert "Ġocean" in dream.get_vocab() and "Ġocean" not in mismatched.get_vocab()  # a missing word...
    assert len(mismatched.tokenize(" ocean")) > 1  # ...split into pieces
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint("rm_mismatched"))
    assert model.config.num_labels == 1 and type(model).__name__ == "Qwen3ForSequenceClassification"


def test_cli_writes_every_checkpoint(tmp_path, capsys):
    toy_main(["tiny", str(tmp_path), "--only", "dream", "rm"])
    assert (tmp_path / "dream" / "model.safetensors").exists() and (tmp_path / "rm" / "config.json").exists()
    assert "dream:" in capsys.readouterr().out
