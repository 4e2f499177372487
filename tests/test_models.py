"""Native Dream and LLaDA models: checkpoint names, upstream equivalence, padding, backends, save/load, LoRA."""

import json
import math
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import rgrl  # noqa: F401  (registers the Auto classes)
from rgrl.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from rgrl.models.layers import RMSNorm, apply_rotary

CONFIGS = Path(rgrl.__file__).parent / "models" / "configs"
UPSTREAM = Path(__file__).parent / "data" / "upstream"

# Tiny sizes, shared with the upstream fixtures in tests/data/upstream/ (everything else: the real Hub config).
DREAM_TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=300, max_position_embeddings=128, max_window_layers=2, rope_theta=10000.0,
    mask_token_id=299, pad_token_id=298, bos_token_id=298, eos_token_id=298,
)  # fmt: skip
LLADA_TINY = dict(
    d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=300, embedding_size=300,
    max_sequence_length=128, rope_theta=10000.0, mask_token_id=299, pad_token_id=298, eos_token_id=298,
)  # fmt: skip
VOCAB = 300


@dataclass
class Family:
    name: str
    config_class: type
    model_class: type
    hub_config: str
    tiny: dict
    layers: str  # the ModuleList of blocks, relative to the top model
    block_params: list[str]  # per-block parameter names of the real checkpoints
    top_params: list[str]
    lora_targets: list[str]
    head: str  # the output projection module
    tie_flag: str
    unsupported: list[dict] = field(default_factory=list)

    def checkpoint_names(self, n_layers: int) -> set[str]:
        blocks = {f"{self.layers}.{i}.{p}" for i, p in product(range(n_layers), self.block_params)}
        return blocks | set(self.top_params)


DREAM = Family(
    name="dream",
    config_class=DreamConfig,
    model_class=DreamModel,
    hub_config="dream_v0_instruct_7b.json",
    tiny=DREAM_TINY,
    layers="model.layers",
    block_params=[
        *(f"self_attn.{p}_proj.{w}" for p, w in product("qkv", ("weight", "bias"))),
        "self_attn.o_proj.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ],
    top_params=["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    head="lm_head",
    tie_flag="tie_word_embeddings",
    unsupported=[dict(use_sliding_window=True), dict(num_key_value_heads=3)],
)
LLADA = Family(
    name="llada",
    config_class=LLaDAConfig,
    model_class=LLaDAModelLM,
    hub_config="llada_8b_instruct.json",
    tiny=LLADA_TINY,
    layers="model.transformer.blocks",
    block_params=[
        f"{p}.weight"
        for p in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm")
    ],
    top_params=["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"],
    lora_targets=["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
    head="model.transformer.ff_out",
    tie_flag="weight_tying",
    unsupported=[
        dict(block_type="sequential"),
        dict(block_group_size=2),
        dict(rope=False),
        dict(alibi=True),
        dict(layer_norm_type="default"),
        dict(layer_norm_with_affine=False),
        dict(bias_for_layer_norm=True),
        dict(bias_for_layer_norm=None, include_bias=True),  # include_bias then also adds layer-norm biases
        dict(attention_layer_norm=True),
        dict(activation_type="swiglu"),
        dict(input_emb_norm=True),
        dict(scale_logits=True),
        dict(n_kv_heads=3),
    ],
)
FAMILIES = pytest.mark.parametrize("family", [DREAM, LLADA], ids=lambda f: f.name)


def tiny_config(family: Family, **overrides):
    """The real Hub config.json with tiny sizes (and any overrides)."""
    config = json.loads((CONFIGS / family.hub_config).read_text())
    config.update(family.tiny, **overrides)
    return family.config_class.from_dict(config)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that attention patterns, RoPE and padding visibly change the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name or "ln_f" in name:
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(noise if "embed_tokens" in name or "wte" in name else 0.2 * noise)
    return model


def tiny_model(family: Family, attn_implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    config = tiny_config(family, **overrides)
    config._attn_implementation = attn_implementation
    return randomize_(family.model_class(config)).eval()


def batch(seed: int = 0, length: int = 10, pads: int = 3):
    """ids [2, L]; row 1 left-padded with `pads` pads in the padded copy. Returns (ids, padded_ids, mask)."""
    ids = torch.randint(0, VOCAB - 2, (2, length), generator=torch.Generator().manual_seed(seed))
    padded = ids.clone()
    padded[1] = torch.cat([torch.full((pads,), VOCAB - 2), ids[1, : length - pads]])
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pads] = 0
    return ids, padded, mask


def logits(model, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).logits


# --- checkpoint layout ---------------------------------------------------------------------------------------


@FAMILIES
def test_state_dict_keys_are_checkpoint_names(family):
    model = tiny_model(family)
    assert set(model.state_dict()) == family.checkpoint_names(2)
    with safe_open(UPSTREAM / family.name / "model.safetensors", "pt") as upstream_file:
        assert set(upstream_file.keys()) == family.checkpoint_names(2)


@FAMILIES
def test_full_size_config_builds_on_meta_with_hub_names_and_size(family):
    config = AutoConfig.from_pretrained(CONFIGS / family.hub_config)
    assert type(config) is family.config_class
    with torch.device("meta"):
        model = family.model_class(config)
    hub = json.loads((UPSTREAM / family.name / "hub_weight_index.json").read_text())
    assert sorted(model.state_dict()) == hub["weight_names"]
    n_params = sum(p.numel() for p in model.parameters())
    assert 2 * n_params == hub["total_size"]  # the Hub shards are bf16
    assert n_params == pytest.approx({"dream": 7.6e9, "llada": 8.0e9}[family.name], rel=0.01)


@pytest.mark.parametrize("name, hidden, billions", [("0.6b", 1024, 0.596), ("1.7b", 2048, 1.72)])
def test_reward_model_configs_build(name, hidden, billions):
    config = AutoConfig.from_pretrained(CONFIGS / f"skywork_reward_v2_qwen3_{name}.json")
    assert (config.model_type, config.num_labels, config.hidden_size) == ("qwen3", 1, hidden)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert type(model).__name__ == "Qwen3ForSequenceClassification"
    assert model.score.weight.shape == (1, hidden)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01)


def test_llada_config_exposes_standard_aliases():
    config = tiny_config(LLADA, n_kv_heads=None, multi_query_attention=True)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 4, 2)
    assert config.num_key_value_heads == 1
    assert tiny_config(LLADA).num_key_value_heads == 4
    assert tiny_config(LLADA, weight_tying=True).tie_word_embeddings is True
    with pytest.raises(ValueError, match="multi_query_attention"):
        _ = tiny_config(LLADA, multi_query_attention=True).num_key_value_heads


@pytest.mark.parametrize(
    "family, override",
    [(f, o) for f in (DREAM, LLADA) for o in f.unsupported],
    ids=lambda x: x.name if isinstance(x, Family) else ",".join(f"{k}={v}" for k, v in x.items()),
)
def test_unsupported_options_raise(family, override):
    config = tiny_config(family, **override)  # the config itself loads, so it can be inspected
    with pytest.raises(ValueError, match=next(iter(override)).split("_")[0]):
        family.model_class(config)


# --- equivalence with the upstream remote code -------------------------------------------------------------


@FAMILIES
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_reproduces_upstream_logits(family, attn_implementation):
    directory = UPSTREAM / family.name
    model = family.model_class.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    inputs, expected = load_file(directory / "inputs.safetensors"), load_file(directory / "logits.safetensors")
    real = inputs["padded_attention_mask"].bool()

    torch.testing.assert_close(logits(model, inputs["input_ids"]), expected["logits"], rtol=0, atol=1e-5)
    padded = logits(model, inputs["padded_input_ids"], attention_mask=inputs["padded_attention_mask"])
    torch.testing.assert_close(padded[real], expected["padded_logits"][real], rtol=0, atol=1e-5)
    if family is DREAM:  # upstream's own calling convention: 4-D boolean mask and explicit position ids
        mask = inputs["padded_attention_mask"].bool()
        mask_4d = mask[:, None, None, :] & mask[:, None, :, None]
        upstream_style = logits(
            model, inputs["padded_input_ids"], attention_mask=mask_4d, position_ids=inputs["padded_position_ids"]
        )
        torch.testing.assert_close(upstream_style[real], expected["padded_logits"][real], rtol=0, atol=1e-5)


def test_layer_math_matches_naive_formulas():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()), expected.float())

    # RoPE: rotate pairs (x_j, x_{j+D/2}) by angle pos * theta^(-2j/D), written as a complex multiplication.
    positions = torch.tensor([[0, 1, 2, 3, 7], [4, 0, 9, 1, 2]], dtype=torch.float64)
    angles = positions[..., None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rotated = (
        torch.view_as_complex(torch.stack(x.chunk(2, -1), -1).contiguous())
        * torch.polar(torch.ones_like(angles), angles)[:, None]
    )
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)


# --- behaviour -------------------------------------------------------------------------------------------------


@FAMILIES
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_row_matches_unpadded(family, attn_implementation):
    model = tiny_model(family, attn_implementation)
    ids, padded, mask = batch(pads=3)
    alone = logits(model, ids[1:, :-3])[0]
    with_pads = logits(model, padded, attention_mask=mask)[1, 3:]
    torch.testing.assert_close(with_pads, alone, rtol=0, atol=1e-5)
    # the check has teeth: attending to the pads changes the real positions
    assert (logits(model, padded)[1, 3:] - alone).abs().max() > 1e-2


@FAMILIES
def test_default_position_ids(family):
    # RoPE is relative, so the padding test above cannot see these; check what reaches the rotary embedding
    model = tiny_model(family)
    seen = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    ids, padded, mask = batch(pads=3)
    model(padded, attention_mask=mask)
    model(ids)
    arange = torch.arange(10)
    if family is DREAM:  # upstream Dream's generation code starts each row's positions at its first real token
        expected = torch.stack([arange, torch.tensor([0, 0, 0, 0, 1, 2, 3, 4, 5, 6])])
    else:  # upstream LLaDA always uses 0..L-1
        expected = arange[None]
    assert torch.equal(seen[0].expand(2, -1), expected.expand(2, -1))
    assert torch.equal(seen[1].expand(2, -1), arange.expand(2, -1))


@FAMILIES
def test_eager_matches_sdpa(family):
    ids, padded, mask = batch(seed=1)
    model = tiny_model(family, "sdpa")
    sdpa = logits(model, padded, attention_mask=mask)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = logits(model, padded, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(eager[real], sdpa[real], rtol=0, atol=2e-5)
    assert not torch.equal(eager, sdpa)  # a different kernel really ran


@FAMILIES
def test_inputs_embeds_equals_input_ids_path(family):
    model = tiny_model(family)
    ids, padded, mask = batch(seed=2)
    embeds = model.get_input_embeddings()(padded)
    out_ids = model(padded, attention_mask=mask, output_hidden_states=True)
    out_embeds = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out_embeds.logits, out_ids.logits, rtol=0, atol=0)
    assert out_ids.logits.shape == (2, 10, VOCAB) and len(out_ids.hidden_states) == 3
    torch.testing.assert_close(model.get_output_embeddings()(out_ids.hidden_states[-1]), out_ids.logits)
    assert model(padded, attention_mask=mask, return_dict=False)[0].shape == (2, 10, VOCAB)
    with pytest.raises(ValueError, match="exactly one"):
        model(padded, inputs_embeds=embeds)


@FAMILIES
def test_kv_cache_is_refused(family):
    model = tiny_model(family)
    ids = batch()[0]
    assert model(ids, use_cache=True).logits.shape == (2, 10, VOCAB)  # accepted: there is no cache to use
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, past_key_values=[(torch.zeros(1),)])
    with pytest.raises(TypeError, match="labels"):
        model(ids, labels=ids)


@FAMILIES
def test_gradient_checkpointing_gives_same_gradients(family):
    model = tiny_model(family).train()
    ids, padded, mask = batch(seed=3)
    first_block = model.get_submodule(family.layers)[0]
    calls = []
    next(m for m in first_block.modules() if isinstance(m, RMSNorm)).register_forward_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        model(padded, attention_mask=mask).logits.log_softmax(-1).mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    assert len(calls) == 1
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls.clear()
    checkpointed = gradients()
    assert len(calls) == 2  # the block ran again during backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-7)


@FAMILIES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_from_pretrained_round_trip(family, dtype, tmp_path):
    model = tiny_model(family).to(dtype)
    ids, padded, mask = batch(seed=4)
    expected = logits(model, padded, attention_mask=mask)
    model.save_pretrained(tmp_path)
    # RoPE frequencies are not saved: they must be recomputed after meta-device loading, not left as garbage
    reloaded = family.model_class.from_pretrained(tmp_path, dtype=dtype).eval()
    assert reloaded.dtype == dtype
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    torch.testing.assert_close(logits(reloaded, padded, attention_mask=mask), expected, rtol=0, atol=0)

    # a Hub-style config with auto_map still loads natively through the Auto classes, without remote code
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = json.loads((CONFIGS / family.hub_config).read_text())["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        auto_model = auto_class.from_pretrained(tmp_path, dtype=dtype).eval()
        assert type(auto_model) is family.model_class
        torch.testing.assert_close(logits(auto_model, padded, attention_mask=mask), expected, rtol=0, atol=0)


@FAMILIES
def test_tied_output_embeddings(family, tmp_path):
    model = tiny_model(family, **{family.tie_flag: True})
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = batch(seed=5)[0]
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        assert f"{family.head}.weight" not in set(saved.keys())
    reloaded = family.model_class.from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)


@FAMILIES
def test_bf16_forward_is_close_to_fp32(family):
    model = tiny_model(family)
    ids, padded, mask = batch(seed=6)
    full = logits(model, padded, attention_mask=mask)
    half = logits(model.to(torch.bfloat16), padded, attention_mask=mask)
    assert half.dtype == torch.bfloat16 and half.shape == full.shape
    assert ((half.float() - full).norm() / full.norm()).item() < 0.03


@FAMILIES
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # CAUSAL_LM: TRL's default LoRA task type
def test_lora_attaches_to_every_block_projection(family, task_type):
    model = tiny_model(family)
    ids, padded, mask = batch(seed=7)
    expected = logits(model, padded, attention_mask=mask)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets, task_type=task_type)
    peft_model = get_peft_model(model, lora)
    wrapped = {
        name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    block_projections = {
        f"{family.layers}.{i}.{p.removesuffix('.weight')}"
        for i, p in product(range(2), family.block_params)
        if "norm" not in p and p.endswith(".weight")
    }
    assert len(block_projections) == 2 * len(family.lora_targets)
    # plain suffix targets also catch LLaDA's output matrix, which shares the name ff_out with the block MLP output
    assert wrapped == block_projections | ({family.head} if family is LLADA else set())
    torch.testing.assert_close(logits(peft_model, padded, attention_mask=mask), expected)  # B starts at zero
    peft_model(padded, attention_mask=mask).logits.mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_B" in n)


def test_dream_rope_scaling_uses_transformers_rope_utilities():
    base = tiny_model(DREAM).model.rotary_emb
    scaled = tiny_model(DREAM, rope_scaling={"type": "linear", "factor": 4.0}).model.rotary_emb
    assert scaled.rope_type == "linear"
    torch.testing.assert_close(scaled.inv_freq, base.inv_freq / 4.0)
    assert math.isclose(base.inv_freq[1].item(), 10000.0 ** (-2 / 8), rel_tol=1e-6)
    with pytest.raises(ValueError, match="dynamic"):
        tiny_model(DREAM, rope_scaling={"type": "dynamic", "factor": 2.0})
