"""The vocabulary bridge: every dLLM logit row -> an embedding row of the reward model.

Guidance feeds the RM mixtures of dLLM tokens, so it needs Ê [V, d_RM] with Ê[v] = the RM's embedding of dLLM
token v. Tokens are compared by the bytes they stand for, not by their raw vocabulary strings, so vocabularies of
different styles meet:
  - byte-level BPE (GPT-2 byte-to-unicode strings: 'Ġthe' is b" the", 'Ċ' is b"\\n"; Qwen2.5/Qwen3/LLaMA-3),
  - SentencePiece ('▁the' is b" the", '<0x0A>' is the byte 0x0A; LLaMA-2/Mistral/Gemma style),
  - anything else: the token string's UTF-8.
Special tokens match only special tokens, by their literal string.

Each dLLM row is one of
  exact     the RM has a token with the same bytes (or the same special string): Ê[v] = E_RM[id];
  split     (with `split=True`) the RM tokenizer's own model cuts the bytes into several RM tokens: Ê[v] is the
            mean of their rows;
  fallback  everything else, including rows at or beyond len(dLLM tokenizer): the RM's EOS row ("eos") or a
            zero vector ("zero").
`split=True` is the default: a dLLM token the RM spells in pieces (" mountain" -> " m" "ou" "n" "t" "ain" in the
tiny mismatched RM) keeps its content in the mean of the pieces' rows, where a fallback would put an end-of-text
(eos) or nothing (zero) in the middle of the response the RM reads. For near-identical vocabularies (Dream and
Qwen3) nothing is split and the default changes nothing; `split=False` gives the reference's 1-to-1 map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import torch

BridgeFallback = Literal["eos", "zero"]  # embedding of dLLM tokens the RM vocabulary lacks
BRIDGE_FALLBACKS = get_args(BridgeFallback)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_SPACE = "\u2581"  # '▁'


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE alphabets)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_byte_table() -> dict[int, int]:
    """str.translate table turning byte-level characters into the latin-1 characters of their bytes."""
    return {ord(char): byte for byte, char in byte_to_unicode().items()}


def vocabulary_style(tokenizer) -> str:
    """'byte_level', 'sentencepiece' or 'plain', from the tokenizer's decoder (or, lacking one, its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is not None:
        state = decoder.__getstate__().decode("utf-8")
        if '"ByteLevel"' in state:
            return "byte_level"
        if any(marker in state for marker in ('"Metaspace"', '"ByteFallback"', _SPIECE_SPACE)):
            return "sentencepiece"
    tokens = list(tokenizer.get_vocab())
    byte_level = sum("Ġ" in t or "Ċ" in t for t in tokens)
    spiece = sum(_SPIECE_SPACE in t for t in tokens)
    if max(byte_level, spiece) < 0.01 * len(tokens):
        return "plain"
    return "byte_level" if byte_level > spiece else "sentencepiece"


def token_bytes(token: str, style: str) -> bytes:
    """The bytes a (non-special) vocabulary string stands for, in a vocabulary of `style`."""
    if style == "byte_level":
        latin = token.translate(_unicode_to_byte_table())
        try:
            return latin.encode("latin-1")
        except UnicodeEncodeError:  # not a byte-level string (e.g. an added token): take its text
            return token.encode("utf-8")
    if style == "sentencepiece":
        byte = _BYTE_TOKEN.fullmatch(token)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return token.replace(_SPIECE_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


class Vocabulary:
    """A tokenizer's vocabulary as matching keys: `keys[id]` is the literal string of a special token and the bytes
    of any other token (added non-special tokens stand for their own text)."""

    def __init__(self, tokenizer):
        self.style = vocabulary_style(tokenizer)
        added = tokenizer.added_tokens_decoder
        by_id = sorted((token_id, token) for token, token_id in tokenizer.get_vocab().items())
        self.tokens: dict[int, str] = dict(by_id)  # in id order
        self.keys: dict[int, str | bytes] = {}
        for token_id, token in self.tokens.items():
            if token_id in added:
                self.keys[token_id] = token if added[token_id].special else token.encode("utf-8")
            else:
                self.keys[token_id] = token_bytes(token, self.style)

    def lookup(self) -> dict[str | bytes, int]:
        """key -> id. Where several tokens share bytes (SentencePiece '▁' and '<0x20>'), the regular piece wins over
        the byte-fallback token, then the lower id."""
        byte_tokens = set()
        if self.style == "sentencepiece":
            byte_tokens = {token_id for token_id, token in self.tokens.items() if _BYTE_TOKEN.fullmatch(token)}
        lookup: dict[str | bytes, int] = {}
        for token_id in [i for i in self.keys if i not in byte_tokens] + sorted(byte_tokens):
            lookup.setdefault(self.keys[token_id], token_id)
        return lookup


@dataclass(frozen=True)
class BridgeCoverage:
    """How the dLLM's rows were mapped (counts over all `rows`)."""

    rows: int
    exact: int
    split: int
    fallback: int
    beyond_tokenizer: int  # rows >= len(dLLM tokenizer); counted in `fallback`
    fallback_kind: str

    @property
    def exact_fraction(self) -> float:
        return self.exact / self.rows

    def summary(self) -> str:
        return (
            f"vocab bridge: {self.rows} dLLM rows -> RM embeddings: exact {self.exact} ({self.exact_fraction:.2%}), "
            f"split {self.split} ({self.split / self.rows:.2%}), fallback[{self.fallback_kind}] {self.fallback} "
            f"({self.fallback / self.rows:.2%}; {self.beyond_tokenizer} rows beyond the tokenizer)"
        )


class VocabBridge:
    """Maps each of the dLLM's `num_rows` logit rows to reward-model embedding rows (see the module docstring).

    Attributes:
        index: [V] long, the RM id of exact matches (and of the EOS fallback), -1 for split and zero-fallback rows.
        matched: [V] bool, exact matches.
        split_rows: [S] long, dLLM rows mapped to the mean of several RM rows; their pieces are
            `split_ids[split_offsets[k]:split_offsets[k+1]]`.
        coverage: the counts, with a `summary()` for logging.
    """

    def __init__(
        self, dllm_tokenizer, rm_tokenizer, num_rows: int | None = None, fallback: str = "eos", split: bool = True
    ):
        if fallback not in BRIDGE_FALLBACKS:
            raise ValueError(f"Unknown bridge fallback {fallback!r}; expected one of {BRIDGE_FALLBACKS}.")
        num_rows = len(dllm_tokenizer) if num_rows is None else num_rows
        fallback_id = -1
        if fallback == "eos":
            if rm_tokenizer.eos_token_id is None:
                raise ValueError("The bridge fallback 'eos' needs an EOS token in the reward model's tokenizer.")
            fallback_id = rm_tokenizer.eos_token_id

        rm_vocabulary = Vocabulary(rm_tokenizer)
        rm_by_key = rm_vocabulary.lookup()
        splitter = _RMSplitter(rm_tokenizer, rm_vocabulary, rm_by_key) if split else None
        index, matched = [fallback_id] * num_rows, [False] * num_rows
        split_rows, split_ids, split_offsets = [], [], [0]
        for row, key in Vocabulary(dllm_tokenizer).keys.items():
            if row >= num_rows:
                continue
            if key in rm_by_key:
                index[row], matched[row] = rm_by_key[key], True
            elif splitter is not None and isinstance(key, bytes) and (pieces := splitter(key)):
                index[row] = -1
                split_rows.append(row)
                split_ids.extend(pieces)
                split_offsets.append(len(split_ids))

        self.num_rows = num_rows
        self.fallback = fallback
        self.index = torch.tensor(index, dtype=torch.long)
        self.matched = torch.tensor(matched, dtype=torch.bool)
        self.split_rows = torch.tensor(split_rows, dtype=torch.long)
        self.split_ids = torch.tensor(split_ids, dtype=torch.long)
        self.split_offsets = torch.tensor(split_offsets, dtype=torch.long)
        exact = int(self.matched.sum())
        self.coverage = BridgeCoverage(
            rows=num_rows,
            exact=exact,
            split=len(split_rows),
            fallback=num_rows - exact - len(split_rows),
            beyond_tokenizer=max(0, num_rows - len(dllm_tokenizer)),
            fallback_kind=fallback,
        )

    def summary(self) -> str:
        return self.coverage.summary()

    def pieces(self, row: int) -> list[int]:
        """The RM ids whose embeddings (averaged) make Ê[row]; empty for a zero-fallback row."""
        if self.index[row] >= 0:
            return [int(self.index[row])]
        k = torch.searchsorted(self.split_rows, row).item()
        if k < len(self.split_rows) and self.split_rows[k] == row:
            return self.split_ids[self.split_offsets[k] : self.split_offsets[k + 1]].tolist()
        return []

    @torch.no_grad()
    def embedding_matrix(self, rm_embeddings: torch.Tensor | torch.nn.Module) -> torch.Tensor:
        """Ê [V, d_RM] (same dtype and device, no grad) from the RM's input embedding weight [V_RM, d_RM], or from
        its embedding module: pass the module when it scales its output (Gemma-3 does), so Ê matches the RM."""
        is_module = isinstance(rm_embeddings, torch.nn.Module)
        weight = (rm_embeddings.weight if is_module else rm_embeddings).detach()
        embed = rm_embeddings if is_module else weight.__getitem__
        if int(torch.cat([self.index, self.split_ids]).max()) >= weight.shape[0]:
            raise ValueError(f"The bridge maps to RM ids beyond the {weight.shape[0]} rows of the given embedding.")
        index = self.index.to(weight.device)
        table = embed(index.clamp(min=0))
        table[index < 0] = 0
        if len(self.split_rows):
            counts = self.split_offsets.diff().to(weight.device)
            segment = torch.repeat_interleave(torch.arange(len(counts), device=weight.device), counts)
            sums = torch.zeros(len(counts), weight.shape[1], dtype=torch.float32, device=weight.device)
            sums.index_add_(0, segment, embed(self.split_ids.to(weight.device)).float())
            table[self.split_rows.to(weight.device)] = (sums / counts.unsqueeze(1)).to(table.dtype)
        return table


class _RMSplitter:
    """Cuts a byte string into RM tokens with the RM tokenizer's own model (BPE/Unigram, no pre-tokenizer)."""

    def __init__(self, rm_tokenizer, vocabulary: Vocabulary, by_key: dict):
        backend = getattr(rm_tokenizer, "backend_tokenizer", None)
        self.model = backend.model if backend is not None else None
        self.vocabulary = vocabulary
        self.by_key = by_key

    def __call__(self, data: bytes) -> list[int] | None:
        """RM ids (two or more) whose bytes concatenate to `data`, or None."""
        if self.model is None:
            return None
        style = self.vocabulary.style
        if style == "byte_level":
            text = "".join(map(byte_to_unicode().__getitem__, data))
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # a partial character: SentencePiece byte-fallback tokens, if it has them
                pieces = [self.by_key.get(bytes([byte])) for byte in data]
                return pieces if None not in pieces and len(pieces) > 1 else None
            if style == "sentencepiece":
                text = text.replace(" ", _SPIECE_SPACE)
        pieces = [token.id for token in self.model.tokenize(text)]
        keys = [self.vocabulary.keys.get(piece) for piece in pieces]
        if len(pieces) < 2 or not all(isinstance(key, bytes) for key in keys) or b"".join(keys) != data:
            return None
        return pieces
