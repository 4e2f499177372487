"""Family adapters: what differs between Dream and LLaDA, and clear errors for what a model lacks."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rgrl.models.family import FamilyError, resolve_family
from rgrl.models.loading import DLLMConfig, load_tokenizer
from rgrl.toy.tiny import build_tokenizer


@pytest.fixture(scope="module")
def dream():
    return DLLMConfig(path="tiny:dream", dtype="float32").load()


@pytest.fixture(scope="module")
def llada():
    return DLLMConfig(path="tiny:llada", dtype="float32").load()


def test_dream_family(dream):
    family, tokenizer = dream.family, dream.tokenizer
    assert family.name == "dream" and family.shifted_logits
    assert family.mask_token_id == tokenizer.convert_tokens_to_ids("<|mask|>") == dream.model.config.mask_token_id
    assert family.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert family.end_of_turn_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert family.stop_token_ids == (family.eos_token_id, family.end_of_turn_token_id)
    assert family.num_tokens == len(tokenizer) < dream.model.config.vocab_size


def test_llada_family(llada):
    family, tokenizer = llada.family, llada.tokenizer
    assert family.name == "llada" and not family.shifted_logits
    assert family.mask_token_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert family.end_of_turn_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_aligned_logits_shift_dream_and_leave_llada():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    tokenizer = build_tokenizer("qwen")
    dream = resolve_family(SimpleNamespace(model_type="Dream", mask_token_id=tokenizer.mask_token_id), tokenizer)
    llada = resolve_family(SimpleNamespace(model_type="llada", mask_token_id=tokenizer.mask_token_id), tokenizer)
    # Dream: the prediction for position i is the raw row i-1 (row 0 reuses itself)
    assert torch.equal(dream.aligned_logits(logits), torch.cat([logits[:, :1], logits[:, :-1]], 1))
    assert torch.equal(dream.aligned_logits(logits, start=2), logits[:, 1:4])
    assert torch.equal(llada.aligned_logits(logits, start=2), logits[:, 2:])


def test_render_prompt_uses_the_chat_template(dream, llada):
    text = dream.family.render_prompt(dream.tokenizer, "Hi there")
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    text = llada.family.render_prompt(llada.tokenizer, [{"role": "user", "content": "Hi there"}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def lora_targets(loaded):
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=loaded.family.lora_target_modules))
    wrapped = sorted(name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                     for name, _ in model.named_modules() if name.endswith("lora_A.default"))
    model.unload()
    return wrapped


def test_default_lora_targets_hit_every_block_projection_and_not_the_head(dream, llada):
    dream_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = sorted(f"model.layers.{i}.{name}" for i in range(2) for name in dream_names)
    assert lora_targets(dream) == expected
    llada_names = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    expected = sorted(f"model.transformer.blocks.{i}.{name}" for i in range(2) for name in llada_names)
    targets = lora_targets(llada)
    assert targets == expected
    assert "model.transformer.ff_out" not in targets  # the LM head shares the name ff_out


def test_unknown_family_needs_explicit_settings():
    tokenizer = build_tokenizer("qwen")
    config = SimpleNamespace(model_type="mdlm", vocab_size=512)
    with pytest.raises(FamilyError, match="Unknown dLLM family for model_type 'mdlm'.*shifted_logits"):
        resolve_family(config, tokenizer)
    family = resolve_family(config, tokenizer, {"shifted_logits": False, "lora_target_modules": ["q", "v"]})
    assert family.mask_token_id == tokenizer.mask_token_id and family.lora_target_modules == ("q", "v")


def test_a_model_without_a_mask_token_gets_a_clear_error():
    tokenizer = build_tokenizer("mismatched")  # no mask token at all
    with pytest.raises(FamilyError, match="no mask token.*model.mask_token_id"):
        resolve_family(SimpleNamespace(model_type="Dream", vocab_size=512), tokenizer)
    family = resolve_family(SimpleNamespace(model_type="Dream", vocab_size=512), tokenizer, {"mask_token_id": 7})
    assert family.mask_token_id == 7


def test_mask_token_disagreement_and_range_are_errors():
    tokenizer = build_tokenizer("qwen")
    with pytest.raises(FamilyError, match="Mask token mismatch"):
        resolve_family(SimpleNamespace(model_type="Dream", mask_token_id=3, vocab_size=512), tokenizer)
    with pytest.raises(FamilyError, match="outside the model's vocabulary"):
        resolve_family(SimpleNamespace(model_type="Dream", mask_token_id=None, vocab_size=100), tokenizer)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DLLMConfig(path="tiny:dream", adapter=str(tmp_path / "no_adapter")).check_paths()


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_completion_logits_project_only_the_needed_rows_and_match_the_full_forward(request, name):
    loaded = request.getfixturevalue(name)
    model, family = loaded.model, loaded.family
    input_ids = torch.randint(0, 400, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, :3] = False  # left padding
    full = family.aligned_logits(model(input_ids=input_ids, attention_mask=attention_mask).logits, start=7)
    kept = family.completion_logits(model, input_ids, attention_mask, num_slots=5)
    assert kept.shape == full.shape == (2, 5, model.config.vocab_size)
    assert torch.allclose(kept, full, atol=1e-6)
    tail = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=6).logits
    assert tail.shape[1] == 6  # the vocabulary projection ran on 6 rows, not 12
