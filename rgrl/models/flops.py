"""What a pass through a transformer costs, counted from its shape: FLOPs and weight bytes.

Counts are those of the matrix products (2 FLOPs per multiply-add), which dominate: the linear layers, the
attention scores and the attention-weighted values, and the output head on the positions it is applied to.
Norms, activations, rotary embeddings and softmaxes are left out (a few percent at most). Every model here attends
bidirectionally over the whole padded width, so pads cost as much as tokens and the count takes the width as run.

For B rows of width S, h query heads and k key/value heads of size e, hidden size d, MLP size f, n layers:

    linear     B·S·n·2·(d·h·e + 2·d·k·e + h·e·d + 3·d·f)      q, k, v, o and the gated MLP (gate, up, down)
    attention  B·n·2·2·S²·h·e                                 scores Q·Kᵀ and weights·V
    head       2·d·R·(rows it is applied to)                  R output rows (vocabulary, or 1 for a classifier)

A backward pass into the *inputs* of a frozen model (guidance differentiates the reward model's input embeddings,
never its weights) repeats each linear product once (dX = dY·Wᵀ; no dW), and twice the attention products
(dQ, dK from the score gradient; dV and the weight gradient from the values). Weight bytes are the parameters
read once per pass, the floor of a pass's memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that set a transformer's cost.

    Attributes:
        hidden_size: d.   num_layers: n.   num_heads: h.   num_kv_heads: k.   head_dim: e.
        intermediate_size: f, of a gated (SwiGLU) MLP.
        vocab_size: rows of the input embedding.
        head_rows: R, rows of the output head (the vocabulary for a LM, `num_labels` for a classifier).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    head_rows: int

    @classmethod
    def from_config(cls, config, head_rows: int | None = None) -> TransformerShape:
        """From a transformers config (Dream, LLaDA, Qwen2/Qwen3, LLaMA naming). `head_rows` defaults to the
        vocabulary (a LM head); pass `config.num_labels` for a sequence classifier."""
        config = config.get_text_config()
        heads = config.num_attention_heads
        vocab = getattr(config, "num_embeddings", None) or config.vocab_size  # LLaDA pads its embedding rows
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "mlp_size", None)
        if intermediate is None:
            raise ValueError(f"Cannot read the MLP size of a {type(config).__name__} (no intermediate_size/mlp_size).")
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=intermediate,
            vocab_size=vocab,
            head_rows=vocab if head_rows is None else head_rows,
        )

    def linear_flops(self, rows: int, width: int) -> int:
        """Linear layers of all blocks over rows × width tokens."""
        d, h, k, e, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        per_token = 2 * (d * h * e + 2 * d * k * e + h * e * d + 3 * d * f)
        return rows * width * self.num_layers * per_token

    def attention_flops(self, rows: int, width: int, keys: int | None = None) -> int:
        """Q·Kᵀ and weights·V of all blocks, `width` query positions each attending to `keys` positions (default:
        all `width`; fewer queries than keys when a prompt cache is reused)."""
        keys = width if keys is None else keys
        return rows * self.num_layers * 4 * width * keys * self.num_heads * self.head_dim

    def head_flops(self, positions: int) -> int:
        """The output head on `positions` positions in all."""
        return 2 * self.hidden_size * self.head_rows * positions

    def forward_flops(self, rows: int, width: int, head_positions: int | None = None, keys: int | None = None) -> int:
        """One forward over [rows, width]; the head on `head_positions` per row (default: every position); `keys`
        positions attended to (default `width`; more when earlier positions come from a key/value cache)."""
        per_row = width if head_positions is None else head_positions
        return (self.linear_flops(rows, width) + self.attention_flops(rows, width, keys)
                + self.head_flops(rows * per_row))

    def input_backward_flops(self, rows: int, width: int, head_positions: int | None = None,
                             keys: int | None = None) -> int:
        """The backward of `forward_flops` into the inputs only (frozen weights)."""
        per_row = width if head_positions is None else head_positions
        return (self.linear_flops(rows, width) + 2 * self.attention_flops(rows, width, keys)
                + self.head_flops(rows * per_row))

    @property
    def num_parameters(self) -> int:
        """Weights of the matrices counted above plus the input embedding (norm weights left out)."""
        d, h, k, e, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        block = d * h * e + 2 * d * k * e + h * e * d + 3 * d * f
        return self.num_layers * block + self.vocab_size * d + self.head_rows * d

    def weight_bytes(self, bytes_per_parameter: int) -> int:
        """Bytes of weights one pass reads (2 for bf16, 4 for fp32)."""
        return self.num_parameters * bytes_per_parameter


def soft_embedding_flops(positions: int, vocab_rows: int, embedding_dim: int, backward: bool) -> int:
    """softmax(φ/τ) @ Ê for `positions` rows of φ [·, V] and Ê [V, d]; with the gradient into φ when `backward`."""
    forward = 2 * positions * vocab_rows * embedding_dim
    return 2 * forward if backward else forward
