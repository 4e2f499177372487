"""Native Dream (Dream-org/Dream-v0-*-7B): the Qwen2.5-7B layout with full bidirectional attention.

Parameter names match the released checkpoints (`model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`,
`model.layers.N.mlp.{gate,up,down}_proj`, the two layer norms, `model.norm`, `lm_head`), so they load without
remote code. Dream was initialised from an autoregressive model and keeps its shift: the logit at position i
predicts token i+1. The model returns raw logits; callers do the alignment.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from rgrl.models.configuration_dream import DreamConfig
from rgrl.models.layers import (
    MaskedDiffusionPreTrainedModel,
    MaskedLMForward,
    PromptCache,
    RMSNorm,
    RotaryEmbedding,
    bidirectional_attention,
    embed_inputs,
    gated_mlp,
    run_decoder,
)


class DreamAttention(nn.Module):
    """Grouped-query self-attention with biased q/k/v projections (Qwen2), no causal mask.

    The attention itself runs in `layers.bidirectional_attention` through
    `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`; transformers looks for that call in
    this file before it allows `model.set_attn_implementation(...)`.
    """

    is_causal = False

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, position_embeddings, attention_mask, prompt_cache=None) -> torch.Tensor:
        attended = bidirectional_attention(
            self, self.q_proj(x), self.k_proj(x), self.v_proj(x), position_embeddings, attention_mask, prompt_cache
        )
        return self.o_proj(attended)


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act_fn)


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                prompt_cache=None) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, prompt_cache
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DreamPreTrainedModel(MaskedDiffusionPreTrainedModel):
    config_class = DreamConfig
    base_model_prefix = "model"
    _no_split_modules = ["DreamDecoderLayer"]


class DreamBaseModel(DreamPreTrainedModel):
    """Embeddings, decoder layers and final norm: input ids -> hidden states [B, L, hidden_size]."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DreamDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config, config.hidden_size // config.num_attention_heads, config.rope_parameters
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | str | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        prompt_cache: PromptCache | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """input_ids [B, L] or inputs_embeds [B, L, hidden] -> last_hidden_state [B, L, hidden].

        attention_mask: None, a 2-D [B, L] padding mask (1 = token, 0 = pad), or upstream's 4-D boolean mask / "full".
        position_ids default to (cumsum(mask) - 1).clamp(min=0) for a 2-D mask, so left pads shift nothing, else
        to 0..L-1. With a `prompt_cache` (`layers.PromptCache`) that is not filling, the inputs are the positions
        after the cached ones, the 2-D mask spans all positions, and position ids are those of the last L.
        """
        inputs_embeds = embed_inputs(self.embed_tokens, input_ids, inputs_embeds, kwargs)
        if isinstance(attention_mask, str):  # upstream's generation code passes "full" for an unpadded batch
            if attention_mask != "full":
                raise ValueError(f"attention_mask string must be 'full', got {attention_mask!r}.")
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1]:]
            else:
                position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        return run_decoder(self.config, self.layers, self.norm, self.rotary_emb, inputs_embeds, attention_mask,
                           position_ids, inputs_embeds.dtype, output_hidden_states, return_dict, prompt_cache)


class DreamModel(MaskedLMForward, DreamPreTrainedModel):
    """Dream with its LM head: forward -> MaskedLMOutput with logits [B, L, vocab] (position i predicts token i+1)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value


__all__ = ["DreamPreTrainedModel", "DreamBaseModel", "DreamModel"]
