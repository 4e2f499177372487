"""Configuration of LLaDA (GSAI-ML/LLaDA-8B-*): an OLMo-style config describing a LLaMA-like bidirectional model.

Accepts the full upstream `ModelConfig` field set with the upstream defaults, so the Hub's config.json loads
unchanged. Only the options the released checkpoints use are implemented (`check_supported` lists the others, which
raise instead of being ignored). `init_*`, `precision` and `flash_attention` describe the upstream training setup
and attention kernel choice, not the architecture: they are kept for round trips but do not change the model
(the attention kernel is chosen with `attn_implementation`). The standard names `hidden_size`,
`num_attention_heads`, `num_hidden_layers`, `num_key_value_heads` and `tie_word_embeddings` are aliases, so generic
code (peft, DeepSpeed auto config, weight tying) works.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

# Activations that work with the "llama" block, mapped to transformers' ACT2FN names.
LLADA_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu": "relu"}


@strict
class LLaDAConfig(PreTrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "tie_word_embeddings": "weight_tying",
    }

    d_model: int = 768
    n_heads: int = 12
    n_kv_heads: int | None = None
    n_layers: int = 12
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = None
    activation_type: str = "swiglu"
    block_type: str = "sequential"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float | int = 8.0
    rope: bool = False
    rope_full_precision: bool = True
    flash_attention: bool = False
    attention_dropout: float | int = 0.1
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    residual_dropout: float | int = 0.1
    embedding_dropout: float | int = 0.1
    input_emb_norm: bool = False
    layer_norm_type: str = "default"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-05
    attention_layer_norm_with_affine: bool = True
    max_sequence_length: int = 1024
    rope_theta: float | int = 10000.0
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = None
    scale_logits: bool = False
    vocab_size: int = 50257
    embedding_size: int | None = 50304
    weight_tying: bool = True
    eos_token_id: int | None = 50256
    pad_token_id: int | None = 50256
    mask_token_id: int | None = 50256
    init_device: str | None = None
    init_fn: str = "normal"
    init_std: float | int = 0.02
    init_cutoff_factor: float | int | None = None
    precision: str | None = None
    use_cache: bool = False

    @property
    def num_key_value_heads(self) -> int:
        """Key/value heads after resolving `n_kv_heads` and `multi_query_attention` as upstream does."""
        if self.multi_query_attention is None:
            return self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        implied = 1 if self.multi_query_attention else self.n_heads
        if self.n_kv_heads not in (None, implied):
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} contradicts multi_query_attention={self.multi_query_attention}."
            )
        return implied

    @property
    def mlp_size(self) -> int:
        """Width of the gated MLP's hidden layer."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def num_embeddings(self) -> int:
        """Rows of the embedding and output matrices (may exceed vocab_size for throughput)."""
        return self.embedding_size or self.vocab_size

    def check_supported(self) -> None:
        """Raise ValueError for upstream options the native model does not implement (called when a model is built)."""
        layer_norm_bias = self.include_bias if self.bias_for_layer_norm is None else self.bias_for_layer_norm
        unsupported = [
            (self.block_type != "llama", f"block_type={self.block_type!r} (only the 'llama' block is implemented)"),
            (self.block_group_size != 1, f"block_group_size={self.block_group_size} (groups rename the parameters)"),
            (not self.rope, "rope=False (the model needs rotary embeddings)"),
            (self.alibi, "alibi=True"),
            (self.layer_norm_type != "rms", f"layer_norm_type={self.layer_norm_type!r} (only 'rms')"),
            (not self.layer_norm_with_affine, "layer_norm_with_affine=False (norms need a weight)"),
            (
                layer_norm_bias,
                f"layer-norm biases (bias_for_layer_norm={self.bias_for_layer_norm}, include_bias={self.include_bias})",
            ),
            (self.attention_layer_norm, "attention_layer_norm=True (QK norms)"),
            (
                self.activation_type not in LLADA_ACTIVATIONS,
                f"activation_type={self.activation_type!r} (the 'llama' block takes {sorted(LLADA_ACTIVATIONS)})",
            ),
            (self.input_emb_norm, "input_emb_norm=True"),
            (self.scale_logits, "scale_logits=True"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ValueError(f"Unsupported LLaDA config: {what}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}.")
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of the {self.num_key_value_heads} kv heads.")
        if self.num_embeddings < self.vocab_size:
            raise ValueError(f"embedding_size {self.embedding_size} is smaller than vocab_size {self.vocab_size}.")


__all__ = ["LLaDAConfig"]
