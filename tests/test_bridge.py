"""VocabBridge: dLLM token id -> RM embedding row, by the bytes each token stands for."""

import json
import random
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from rgrl.models.loading import load_tokenizer, resolve_checkpoint
from rgrl.toy.tiny import build_tokenizer
from rgrl.rewards.bridge import VocabBridge, byte_to_unicode, token_bytes, vocabulary_style

HELD_OUT = (" ocean", " mountain", " robot", " bread")  # missing from the mismatched RM vocabulary
WORDS = ("the", "cat", "dog", "friend", "likes", "garden", "today", "every")  # one token in every vocabulary here
SENTENCES = [
    f"{a} {b} {c} {d}."
    for a in ("The cat", "A dog", "My friend")
    for b in ("likes", "paints", "finds")
    for c in ("the garden", "a letter", "quiet music")
    for d in ("today", "every morning")
]


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer("qwen")


@pytest.fixture(scope="module")
def mismatched():
    return build_tokenizer("mismatched")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A LLaMA-2-style tokenizer: BPE over '▁'-marked words, <0xNN> byte-fallback tokens, <unk>/<s>/</s> first."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    spec = json.loads(trained.to_str())
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    learned = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    vocab = {token: i for i, token in enumerate(head + learned)}
    merges = [tuple(merge) for merge in spec["model"]["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def single_token(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, tokenizer.convert_ids_to_tokens(ids))
    return ids[0]


def test_token_bytes_of_both_styles():
    assert token_bytes("Ġthe", "byte_level") == b" the"
    assert token_bytes("Ċ", "byte_level") == b"\n"
    assert token_bytes("Ã©", "byte_level") == "é".encode()
    assert token_bytes("▁the", "sentencepiece") == b" the"
    assert token_bytes("<0x0A>", "sentencepiece") == b"\n"
    assert len(set(byte_to_unicode().values())) == 256


def test_identical_tokenizers_map_to_the_same_ids():
    """Dream's tiny tokenizer and the tiny RM's: every token matches itself; padded rows take the fallback."""
    dream_tokenizer, rm_tokenizer = load_tokenizer("tiny:dream"), load_tokenizer("tiny:rm")
    rows = AutoConfig.from_pretrained(resolve_checkpoint("tiny:dream")).vocab_size
    assert rows > len(dream_tokenizer)
    bridge = VocabBridge(dream_tokenizer, rm_tokenizer, num_rows=rows)
    n = len(dream_tokenizer)
    assert torch.equal(bridge.index[:n], torch.arange(n)) and bridge.matched[:n].all()
    assert (bridge.index[n:] == rm_tokenizer.eos_token_id).all() and not bridge.matched[n:].any()
    assert (bridge.coverage.exact, bridge.coverage.split, bridge.coverage.fallback) == (n, 0, rows - n)
    assert bridge.coverage.beyond_tokenizer == rows - n
    assert f"exact {n}" in bridge.summary()


@pytest.mark.parametrize("split", [False, True])
def test_mismatched_rm(qwen, mismatched, split):
    bridge = VocabBridge(qwen, mismatched, fallback="zero", split=split)
    for word in WORDS:  # words both know map by string, to different ids
        source, target = single_token(qwen, " " + word), single_token(mismatched, " " + word)
        assert bridge.matched[source] and bridge.index[source] == target
    assert bridge.index[qwen.convert_tokens_to_ids("<|endoftext|>")] == -1  # no such special in the RM
    weight = torch.randn(len(mismatched), 8)
    table = bridge.embedding_matrix(weight)
    for word in HELD_OUT:
        row = single_token(qwen, word)
        assert not bridge.matched[row]
        pieces = mismatched(word, add_special_tokens=False).input_ids  # how the RM itself writes the word
        expected = weight[pieces].mean(0) if split else torch.zeros(8)
        torch.testing.assert_close(table[row], expected)
    assert (bridge.coverage.split > len(HELD_OUT)) == split
    assert bridge.coverage.exact + bridge.coverage.split + bridge.coverage.fallback == len(qwen)


def test_fallback_rows_eos_or_zero(qwen, mismatched):
    weight = torch.randn(len(mismatched), 8)
    unmatched = [qwen.convert_tokens_to_ids(t) for t in ("<|mask|>", "<|im_start|>")] + [len(qwen), len(qwen) + 9]
    for fallback in ("eos", "zero"):
        bridge = VocabBridge(qwen, mismatched, num_rows=len(qwen) + 10, fallback=fallback)
        table = bridge.embedding_matrix(weight)
        expected = weight[mismatched.eos_token_id] if fallback == "eos" else torch.zeros(8)
        for row in unmatched:
            torch.testing.assert_close(table[row], expected)
        assert bridge.coverage.beyond_tokenizer == 10
        assert f"fallback[{fallback}]" in bridge.summary()
        matched = bridge.matched.nonzero().squeeze(1)
        torch.testing.assert_close(table[matched], weight[bridge.index[matched]])
        torch.testing.assert_close(bridge.embedding_matrix(torch.nn.Embedding.from_pretrained(weight)), table)
    with pytest.raises(ValueError, match="fallback"):
        VocabBridge(qwen, mismatched, fallback="unk")


def test_byte_level_meets_sentencepiece(qwen):
    spiece = sentencepiece_tokenizer()
    assert (vocabulary_style(qwen), vocabulary_style(spiece)) == ("byte_level", "sentencepiece")
    for source, target in ((qwen, spiece), (spiece, qwen)):
        bridge = VocabBridge(source, target, split=False)
        for word in WORDS:  # 'Ġthe' <-> '▁the'
            row = single_token(source, " " + word)
            assert bridge.matched[row] and bridge.index[row] == single_token(target, " " + word)
    to_spiece = VocabBridge(qwen, spiece, split=False)
    assert to_spiece.index[qwen.convert_tokens_to_ids("Ċ")] == spiece.convert_tokens_to_ids("<0x0A>")
    assert to_spiece.index[qwen.convert_tokens_to_ids("Ġ")] == spiece.convert_tokens_to_ids("▁")  # not <0x20>
    from_spiece = VocabBridge(spiece, qwen, split=False)
    assert from_spiece.index[spiece.convert_tokens_to_ids("<0x0A>")] == qwen.convert_tokens_to_ids("Ċ")
    assert to_spiece.index[qwen.convert_tokens_to_ids("Ã")] == spiece.convert_tokens_to_ids("<0xC3>")  # a lone byte
    # A byte-level token the SentencePiece RM spells in pieces: exactly the pieces its own tokenizer produces.
    split = VocabBridge(qwen, spiece, split=True)
    row = single_token(qwen, " robot")
    assert not split.matched[row] and split.index[row] == -1
    assert split.pieces(row) == spiece(" robot", add_special_tokens=False).input_ids  # '▁' 'r' 'o' '<0x62>' 'o' 't'
    assert split.pieces(single_token(qwen, " the")) == [single_token(spiece, " the")]


def test_llama3_style_dllm_against_qwen_style_rm(qwen):
    llama3 = build_tokenizer("llama3")
    bridge = VocabBridge(llama3, qwen, num_rows=512)
    shared = "<|endoftext|>"  # specials match by their string, whatever their ids
    assert llama3.convert_tokens_to_ids(shared) != qwen.convert_tokens_to_ids(shared)
    assert bridge.index[llama3.convert_tokens_to_ids(shared)] == qwen.convert_tokens_to_ids(shared)
    for special in ("<|eot_id|>", "<|mdm_mask|>", "<|start_header_id|>"):
        assert bridge.index[llama3.convert_tokens_to_ids(special)] == qwen.eos_token_id
    for word in WORDS:
        assert bridge.index[single_token(llama3, " " + word)] == single_token(qwen, " " + word)
    assert bridge.coverage.exact_fraction > 0.8


def synthetic_tokenizer(size: int, seed: int, style: str) -> PreTrainedTokenizerFast:
    """A vocabulary of `size` random word pieces (no merges): for timing the bridge at real sizes."""
    rng, to_unicode, letters = random.Random(seed), byte_to_unicode(), "abcdefghijkl"
    if style == "byte_level":
        vocab = {to_unicode[byte]: byte for byte in range(256)}
    else:
        vocab = {token: i for i, token in enumerate([f"<0x{b:02X}>" for b in range(256)] + list(letters) + ["▁"])}
    while len(vocab) < size:
        word = ("▁" if rng.random() < 0.5 else "") + "".join(rng.choices(letters, k=rng.randint(2, 7)))
        token = "".join(to_unicode[b] for b in word.replace("▁", " ").encode()) if style == "byte_level" else word
        vocab.setdefault(token, len(vocab))
    if style == "byte_level":
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.decoder = decoders.ByteLevel()
    else:
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_real_vocabulary_sizes_are_fast():
    """152k byte-level dLLM rows against a 126k SentencePiece RM, most of them split: well under the budget."""
    dllm, rm = synthetic_tokenizer(152_000, 0, "byte_level"), synthetic_tokenizer(126_000, 1, "sentencepiece")
    start = time.perf_counter()
    bridge = VocabBridge(dllm, rm, num_rows=152_064)
    table = bridge.embedding_matrix(torch.randn(len(rm), 16))
    elapsed = time.perf_counter() - start
    assert table.shape == (152_064, 16)
    assert bridge.coverage.exact > 10_000 and bridge.coverage.split > 100_000
    assert elapsed < 10, elapsed
