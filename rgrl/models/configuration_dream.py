"""Configuration of Dream (Dream-org/Dream-v0-*-7B): the Qwen2.5 layout run as a bidirectional masked diffusion LM.

Reads the Hub's config.json unchanged: Qwen2-style fields plus `mask_token_id`, with the upstream defaults.
`rope_theta` / `rope_scaling` are folded into transformers' standard `rope_parameters` on load.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


@strict
class DreamConfig(PreTrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    attention_dropout: float | int = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.sliding_window = self.sliding_window if self.use_sliding_window else None
        super().__post_init__(**kwargs)

    def to_dict(self) -> dict:
        """Also write `rope_theta` / `rope_scaling`: the upstream remote code reads only those and would silently fall
        back to theta=10000 on a checkpoint saved here. Loading reads `rope_parameters` first, so nothing changes."""
        output = super().to_dict()
        rope = dict(self.rope_parameters)
        output["rope_theta"] = rope.pop("rope_theta")
        output["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        return output

    def check_supported(self) -> None:
        """Raise ValueError for settings the native model does not implement (called when a model is built)."""
        if self.use_sliding_window:
            raise ValueError(
                "Dream with use_sliding_window=True is not supported (the released models use full attention)."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}."
            )


__all__ = ["DreamConfig"]
