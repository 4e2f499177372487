"""Tiny offline checkpoints: Dream- and LLaDA-architecture dLLMs and Qwen3 reward models, built in seconds.

The Hugging Face Hub is out of reach on CI and dev machines, so tests and the CPU recipes run on checkpoints
that rgrl builds itself. Each one is an ordinary model directory (config.json with the real checkpoint's
`architectures`/`auto_map`, safetensors, a byte-level BPE tokenizer trained locally with special tokens and
a chat template shaped like the real ones) and loads through the same `from_pretrained` path as the real
checkpoint. The dimensions are tiny; every other config field comes from the full-size config shipped in
`rgrl/models/configs/`.

    dream          Dream layout, Qwen-style tokenizer (<|mask|>, <|endoftext|>, <|im_end|>)
    llada          LLaDA layout, LLaMA-3-style tokenizer (<|mdm_mask|>, <|eot_id|>)
    rm             Qwen3ForSequenceClassification sharing the Dream tokenizer (like Skywork-V2-Qwen3 and Dream)
    rm_mismatched  Qwen3ForSequenceClassification with its own smaller tokenizer: other ids, other template,
                   some words missing or split into pieces (exercises the vocabulary bridge)

`python -m rgrl.toy tiny OUT_DIR` writes all four; `tiny_checkpoint(name)` builds one into a cache once (the `tiny:`
scheme of the loader, registered by `rgrl.toy`).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rgrl.models.family import LLAMA3_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE
from rgrl.models.loading import architecture_config

TINY_CHECKPOINTS = ("dream", "llada", "rm", "rm_mismatched")
TINY_FORMAT_VERSION = "1"  # bump when the built artefacts change, so caches are rebuilt

RM_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "a robot", "the river", "her sister"]
_VERBS = ["likes", "found", "paints", "writes about", "remembers", "carries", "explains", "visits"]
_OBJECTS = ["the garden", "a letter", "bright colours", "old maps", "the ocean", "fresh bread", "a small boat",
            "quiet music", "the mountain", "green apples", "a long story", "warm tea"]
_ENDINGS = ["today.", "every morning.", "with care.", "in the rain.", "at night.", "again and again.", "!", "?"]
_CHAT_WORDS = ["You are a helpful assistant.", "system", "user", "assistant"] * 20
# Words the mismatched reward tokenizer never sees, so the bridge must fall back or split them.
_HELD_OUT_WORDS = ("ocean", "mountain", "robot", "bread")


def _corpus(num_sentences: int, seed: int, exclude: tuple[str, ...] = ()) -> list[str]:
    rng = random.Random(seed)
    sentences = []
    while len(sentences) < num_sentences:
        sentence = " ".join(rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS))
        if not any(word in sentence for word in exclude):
            sentences.append(sentence[0].upper() + sentence[1:])
    return sentences + _CHAT_WORDS


def train_byte_level_bpe(corpus: list[str], vocab_size: int, leading_specials: list[str]) -> Tokenizer:
    """A byte-level BPE like Qwen2.5/Qwen3/LLaMA-3 (GPT-2 byte-to-unicode strings, 'Ġ' for space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=leading_specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, trailing_specials: list[str], chat_template: str,
                   **special_tokens) -> PreTrainedTokenizerFast:
    # Special tokens added after training get the highest ids, as in the real vocabularies.
    tokenizer.add_special_tokens(trailing_specials)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
    wrapped.chat_template = chat_template
    wrapped.padding_side = "left"
    return wrapped


def build_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """Build one of the tiny tokenizers: "qwen" (Dream and rm), "llama3" (LLaDA) or "mismatched" (rm_mismatched)."""
    if style == "qwen":
        base = train_byte_level_bpe(_corpus(2000, seed=0), vocab_size=600, leading_specials=[])
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]
        return wrap_tokenizer(base, specials, QWEN_CHAT_TEMPLATE, bos_token="<|beginoftext|>", eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>", mask_token="<|mask|>")
    if style == "llama3":
        base = train_byte_level_bpe(_corpus(2000, seed=1), vocab_size=560, leading_specials=[])
        specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|mdm_mask|>"]
        return wrap_tokenizer(base, specials, LLAMA3_CHAT_TEMPLATE, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>")
    if style == "mismatched":
        specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
        base = train_byte_level_bpe(_corpus(2000, seed=2, exclude=_HELD_OUT_WORDS), vocab_size=380,
                                     leading_specials=specials)
        return wrap_tokenizer(base, [], RM_CHAT_TEMPLATE, eos_token="<|end|>", pad_token="<|pad|>")
    raise ValueError(f"Unknown tiny tokenizer style {style!r}; expected 'qwen', 'llama3' or 'mismatched'.")


def padded_rows(tokenizer) -> int:
    """Embedding rows: the tokenizer's size rounded up to a multiple of 64, like the real checkpoints."""
    return -(-len(tokenizer) // 64) * 64


def _tiny_config(name: str, tokenizer):
    rows = padded_rows(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if name == "dream":
        return architecture_config("dream-v0-instruct-7b", vocab_size=rows, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, mask_token_id=tokenizer.mask_token_id,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    if name == "llada":
        return architecture_config("llada-8b-instruct", vocab_size=rows, embedding_size=rows, d_model=64,
                                   n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=128,
                                   max_sequence_length=1024,
                                   mask_token_id=tokenizer.convert_tokens_to_ids("<|mdm_mask|>"),
                                   eos_token_id=eos, pad_token_id=pad)
    if name in ("rm", "rm_mismatched"):
        return architecture_config("skywork-reward-v2-qwen3-0.6b", vocab_size=rows, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    raise ValueError(f"Unknown tiny checkpoint {name!r}; expected one of {TINY_CHECKPOINTS}.")


def build_tiny_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny checkpoint `name` (see module docstring) to `out_dir`; deterministic for a given seed."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    style = {"dream": "qwen", "llada": "llama3", "rm": "qwen", "rm_mismatched": "mismatched"}.get(name)
    if style is None:
        raise ValueError(f"Unknown tiny checkpoint {name!r}; expected one of {TINY_CHECKPOINTS}.")
    tokenizer = build_tokenizer(style)
    config = _tiny_config(name, tokenizer)
    auto_class = AutoModelForSequenceClassification if name.startswith("rm") else AutoModel
    torch.manual_seed(seed)
    model = auto_class.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _cache_root() -> Path:
    root = os.environ.get("RGRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rgrl")
    return Path(root) / "tiny" / f"v{TINY_FORMAT_VERSION}"


def tiny_checkpoint(name: str) -> Path:
    """Path of the cached tiny checkpoint `name`, building it (atomically) on first use."""
    target = _cache_root() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_checkpoint(name, staging)
        os.replace(staging, target)  # atomic: readers see either nothing or a whole checkpoint
    except OSError:
        if not (target / "config.json").exists():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target

