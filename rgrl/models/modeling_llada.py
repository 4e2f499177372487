"""Native LLaDA (GSAI-ML/LLaDA-8B-*): a LLaMA-like bidirectional transformer with OLMo-style module names.

Parameter names match the released checkpoints: `model.transformer.wte`, `model.transformer.blocks.N.{attn_norm,
q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}`, `model.transformer.ln_f` and the output
matrix `model.transformer.ff_out` (tied to `wte` and left out of saved checkpoints when `weight_tying`). The logit
at position i predicts token i. Position ids default to 0..L-1, as upstream; RoPE is relative and padding is hidden
by the attention mask, so left padding changes nothing.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from rgrl.models.configuration_llada import LLADA_ACTIVATIONS, LLaDAConfig
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


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """Pre-norm block holding its own projections (upstream's "llama" block): attention, then a gated MLP."""

    is_causal = False

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.d_model // config.n_heads
        self.num_key_value_groups = config.n_heads // config.num_key_value_heads
        self.attention_dropout = config.attention_dropout
        d_model, kv_size, bias = config.d_model, config.num_key_value_heads * self.head_dim, config.include_bias
        qkv_bias = bias or bool(config.include_qkv_bias)
        self.attn_norm = RMSNorm(d_model, config.rms_norm_eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, kv_size, bias=qkv_bias)
        self.attn_out = nn.Linear(d_model, d_model, bias=bias)
        self.ff_norm = RMSNorm(d_model, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d_model, config.mlp_size, bias=bias)  # the gate
        self.up_proj = nn.Linear(d_model, config.mlp_size, bias=bias)
        self.ff_out = nn.Linear(config.mlp_size, d_model, bias=bias)
        self.act = ACT2FN[LLADA_ACTIVATIONS[config.activation_type]]
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None,
                prompt_cache=None) -> torch.Tensor:
        x = self.attn_norm(hidden_states)
        attended = bidirectional_attention(
            self, self.q_proj(x), self.k_proj(x), self.v_proj(x), position_embeddings, attention_mask, prompt_cache
        )
        hidden_states = hidden_states + self.dropout(self.attn_out(attended))
        mlp_out = gated_mlp(self.ff_norm(hidden_states), self.ff_proj, self.up_proj, self.ff_out, self.act)
        return hidden_states + self.dropout(mlp_out)


class LLaDAPreTrainedModel(MaskedDiffusionPreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDALlamaBlock"]


class LLaDAModel(LLaDAPreTrainedModel):
    """`transformer.{wte, blocks, ln_f}`: input ids -> hidden states [B, L, d_model]. Also owns the output matrix
    `transformer.ff_out` (where the checkpoints keep it), which `LLaDAModelLM` applies."""

    _tied_weights_keys = {"transformer.ff_out.weight": "transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.num_embeddings, config.d_model),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config, i) for i in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
                # upstream multiplies by wte directly when tied, so a tied head has no bias
                "ff_out": nn.Linear(
                    config.d_model, config.num_embeddings, bias=config.include_bias and not config.weight_tying
                ),
            }
        )
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.rotary_emb = RotaryEmbedding(
            config, config.d_model // config.n_heads, {"rope_type": "default", "rope_theta": config.rope_theta}
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        prompt_cache: PromptCache | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """input_ids [B, L] or inputs_embeds [B, L, d_model] -> last_hidden_state [B, L, d_model] (after ln_f).

        attention_mask: None or a 2-D [B, L] padding mask (1 = token, 0 = pad; pads are hidden as keys).
        position_ids: default 0..L-1 (with a `prompt_cache` that is not filling: the last L of the mask's width).
        """
        inputs_embeds = embed_inputs(self.transformer.wte, input_ids, inputs_embeds, kwargs)
        if position_ids is None:
            width = inputs_embeds.shape[1] if attention_mask is None else attention_mask.shape[-1]
            position_ids = torch.arange(width - inputs_embeds.shape[1], width, device=inputs_embeds.device)[None]
        rope_dtype = torch.float32 if self.config.rope_full_precision else inputs_embeds.dtype
        return run_decoder(self.config, self.transformer.blocks, self.transformer.ln_f, self.rotary_emb,
                           self.embedding_dropout(inputs_embeds), attention_mask, position_ids, rope_dtype,
                           output_hidden_states, return_dict, prompt_cache)


class LLaDAModelLM(MaskedLMForward, LLaDAPreTrainedModel):
    """LLaDA with logits: forward -> MaskedLMOutput with logits [B, L, embedding_size] (position i predicts token i)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value


__all__ = ["LLaDAPreTrainedModel", "LLaDAModel", "LLaDAModelLM"]
