"""Building blocks shared by the native Dream and LLaDA models, and their common PreTrainedModel base.

Both checkpoints are pre-norm transformers with RMSNorm, rotary position embeddings, a gated (SwiGLU-style) MLP and
full bidirectional self-attention; they differ in module names and a few switches. The math lives here once; the
modeling files only arrange it under each checkpoint's parameter names.

Shapes: B batch, L sequence length, H query heads, Hkv key/value heads, D head dim.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

# RoPE variants whose frequencies change with the sequence length at run time; nothing here updates them.
_RUNTIME_ROPE_TYPES = ("dynamic", "longrope")


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) computed in float32, cast back to the input dtype, then scaled."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for arbitrary (e.g. left-padding-aware) position ids.

    `rope_parameters` is a transformers RoPE dict ({"rope_type", "rope_theta", ...}). "default" is computed here; the
    static scaled variants ("linear", "yarn", "llama3", ...) come from transformers' `ROPE_INIT_FUNCTIONS`, which
    read `config`.
    """

    def __init__(self, config, head_dim: int, rope_parameters: dict):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.rope_parameters = rope_parameters
        self.rope_type = rope_parameters.get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"Unknown RoPE type {self.rope_type!r}.")
        if self.rope_type in _RUNTIME_ROPE_TYPES:
            raise ValueError(f"RoPE type {self.rope_type!r} rescales with the sequence length and is not supported.")
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [D/2] (float32) and the cos/sin scaling factor of the RoPE variant."""
        if self.rope_type == "default":
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / (self.rope_parameters["rope_theta"] ** exponents), 1.0
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would round the frequencies. Keep them float32, as a model loaded in bf16 has
        # them and as upstream LLaDA computes its tables whatever the model dtype; device moves apply as usual.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.compute_inv_freq()[0].to(self.inv_freq.device)
        return self

    def reset_inv_freq(self) -> None:
        """Recompute the buffer, e.g. after the model was materialised from the meta device."""
        init.copy_(self.inv_freq, self.compute_inv_freq()[0])

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> (cos, sin), each [B, L, D] in `dtype` (angles are always computed in float32)."""
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, L, D] by cos/sin [B, L, D]; the rotation runs in cos's dtype, the result has x's."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = x.to(cos.dtype)
    return (rotated * cos + rotate_half(rotated) * sin).to(x.dtype)


def gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, act: Callable) -> torch.Tensor:
    """down(act(gate(x)) * up(x)): SwiGLU when act is SiLU."""
    return down(act(gate(x)) * up(x))


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. query [B, H, L, D], key/value [B, Hkv, L, D], mask additive [B, 1, L, L].

    Returns the output [B, L, H, D] (the layout every transformers attention backend returns) and the weights.
    """
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@dataclass
class PromptCache:
    """Keys and values of the first `length` positions, per layer, kept from one forward and reused by later ones.

    The cache mode of sampling (beyond the paper): a forward over the whole canvas with `filling=True` stores the
    rotated keys/values of positions 0..length-1; forwards with `filling=False` then run only the positions from
    `length` on (their `input_ids`; the attention mask still spans every position) and attend to the stored ones.
    In a bidirectional model the stored keys/values also depend on the later tokens, so reuse after those change is
    an approximation (as in Fast-dLLM); right after filling it is exact.
    """

    length: int
    filling: bool = True
    keys: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    values: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def extend(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys/values [B, Hkv, L, D] -> those it attends to: stored (filling) or prefixed by the store."""
        if self.filling:
            self.keys[layer], self.values[layer] = key[:, :, : self.length], value[:, :, : self.length]
            return key, value
        return torch.cat([self.keys[layer], key], dim=2), torch.cat([self.values[layer], value], dim=2)


def bidirectional_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    prompt_cache: PromptCache | None = None,
) -> torch.Tensor:
    """Full (non-causal) multi-head attention over projected q [B, L, H*D] and k/v [B, L, Hkv*D] -> [B, L, H*D].

    `module` is the layer owning the projections; it is what transformers' attention backends receive, so it carries
    `config` (for `_attn_implementation`), `head_dim`, `num_key_value_groups`, `attention_dropout`, `layer_idx` and
    `is_causal = False`. The mask comes from `bidirectional_attention_mask`. With a `prompt_cache` that is not
    filling, the queries also attend to the cached positions before them.
    """
    batch, length = query.shape[:2]
    query, key, value = (t.view(batch, length, -1, module.head_dim).transpose(1, 2) for t in (query, key, value))
    cos, sin = position_embeddings
    query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    if prompt_cache is not None:
        key, value = prompt_cache.extend(module.layer_idx, key, value)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention)
    output, _ = attention(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=module.attention_dropout if module.training else 0.0,
        scaling=module.head_dim**-0.5,
        is_causal=False,
    )
    return output.reshape(batch, length, -1)


def bidirectional_attention_mask(
    config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Turn a padding mask into the form `config._attn_implementation` expects; every query sees every real token.

    attention_mask: None (no padding), a 2-D [B, L] mask (1/True = real token, 0 = padding; pads are hidden as keys),
    or an already built 4-D boolean [B, 1, L, L] mask (True = may attend), as upstream Dream's generation code passes.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:
        return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    if attention_mask.ndim == 4 and attention_mask.dtype == torch.bool:
        implementation = config._attn_implementation
        if implementation == "sdpa":
            return attention_mask
        if implementation == "eager":
            zero = torch.zeros((), dtype=inputs_embeds.dtype, device=attention_mask.device)
            return torch.where(attention_mask, zero, torch.finfo(inputs_embeds.dtype).min)
        raise ValueError(
            f"A 4-D attention mask only works with attn_implementation 'sdpa' or 'eager', not {implementation!r}; "
            "pass the 2-D [batch, length] padding mask instead."
        )
    raise ValueError(
        "attention_mask must be None, a [batch, length] padding mask, or a boolean [batch, 1, length, length] mask; "
        f"got shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype}."
    )


def embed_inputs(
    embedding: nn.Embedding, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, kwargs: dict
) -> torch.Tensor:
    """Validate the forward arguments and return the input embeddings [B, L, hidden]."""
    check_forward_kwargs(kwargs)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    return embedding(input_ids) if inputs_embeds is None else inputs_embeds


def run_decoder(
    config,
    layers: nn.ModuleList,
    final_norm: nn.Module,
    rotary_emb: "RotaryEmbedding",
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    rope_dtype: torch.dtype,
    output_hidden_states: bool | None,
    return_dict: bool | None,
    prompt_cache: PromptCache | None = None,
) -> BaseModelOutput | tuple:
    """The layer stack of both families: hidden_states [B, L, hidden] -> normed last_hidden_state [B, L, hidden].

    With a `prompt_cache` that is not filling, hidden_states are the positions after the cached ones and a 2-D
    attention_mask spans all positions [B, cached + L]."""
    if prompt_cache is not None and not prompt_cache.filling and attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError("A prompt cache takes a 2-D [batch, cached + length] attention mask.")
        queries = hidden_states.shape[1]  # every query may attend to every real token, cached ones included
        attention_mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, queries, -1)
    mask = bidirectional_attention_mask(config, hidden_states, attention_mask)
    position_embeddings = rotary_emb(position_ids, dtype=rope_dtype)
    all_hidden_states = []
    for layer in layers:
        all_hidden_states.append(hidden_states)
        hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                              prompt_cache=prompt_cache)
    hidden_states = final_norm(hidden_states)
    all_hidden_states.append(hidden_states)
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    output = BaseModelOutput(
        last_hidden_state=hidden_states, hidden_states=tuple(all_hidden_states) if output_hidden_states else None
    )
    return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


def check_forward_kwargs(kwargs: dict) -> None:
    """Diffusion LMs decode without a KV cache: accept `use_cache`, refuse a cache or other requests outright.

    Arguments passed as None (or False) are treated as absent, since wrappers such as peft forward `labels=None`.
    """
    kwargs.pop("use_cache", None)  # there is no cache to turn on or off
    if kwargs.pop("past_key_values", None) is not None or kwargs.pop("cache", None) is not None:
        raise ValueError("This masked diffusion model has no KV cache; do not pass past_key_values.")
    if kwargs.pop("output_attentions", None):
        raise ValueError("output_attentions is not supported by the native Dream/LLaDA models.")
    unexpected = sorted(name for name, value in kwargs.items() if value is not None and value is not False)
    if unexpected:
        raise TypeError(f"Unexpected forward arguments: {unexpected}.")


class MaskedDiffusionPreTrainedModel(PreTrainedModel):
    """What the Dream and LLaDA model classes share: checks, init, backends, and no autoregressive generation."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    accepts_loss_kwargs = False  # the Trainer must not pass num_items_in_batch to forward

    def __init__(self, config, *args, **kwargs):
        config.check_supported()
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq()

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # Looked up (not called) by peft's task_type="CAUSAL_LM" wrapper, TRL's default LoRA task type.
        raise NotImplementedError(
            f"{type(self).__name__} is a masked diffusion model without autoregressive generate(); "
            "sample with rgrl.sampling instead."
        )


class MaskedLMForward:
    """The forward of both LM classes: the base model (`self.model`), then the output matrix on the kept positions."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | str | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prompt_cache: PromptCache | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """Logits [B, L, vocab] in the model dtype (see the base model's forward for the inputs).

        logits_to_keep: if an int > 0, only the last `logits_to_keep` positions get logits ([B, logits_to_keep,
        vocab]; transformers' convention), which spares the vocabulary projection of a long prompt. If a boolean
        [B, L] tensor, only the positions where it is True get logits, packed in row-major order: [N, vocab].
        prompt_cache: see `PromptCache` (L is then the number of positions after the cached ones).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            prompt_cache=prompt_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[logits_to_keep]
        elif logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        output = MaskedLMOutput(logits=self.get_output_embeddings()(hidden_states), hidden_states=outputs.hidden_states)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()
