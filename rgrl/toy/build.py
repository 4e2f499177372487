"""Building the toy world's checkpoints: two small dLLMs (Dream and LLaDA layouts) and two reward models.

    dream     Dream layout (shifted logits), word-level tokenizer with Qwen-style special tokens and chat template
    llada     LLaDA layout (unshifted logits), the same words under other ids, LLaMA-3-style specials and template
    rm        Qwen3ForSequenceClassification sharing the Dream tokenizer (as Skywork-V2-Qwen3 shares Dream's)
    rm_llada  Qwen3ForSequenceClassification with its own byte-level BPE tokenizer and chat template; a few words
              of the world are not in it as whole tokens, so the LLaDA → RM vocabulary bridge must split them

The dLLMs learn the base behaviour of `rgrl.toy.world.corpus` (36% of it satisfies its instruction). Trained
from scratch with the masked-diffusion loss alone, models this small learn the grammar but not to read the prompt
(issue 6); what works is a warm start: the first part of training is causal next-token prediction (a causal
attention mask, position i predicts token i+1), the rest bidirectional masked diffusion. For Dream that is how the
real model was made (from Qwen2.5, keeping the shift). LLaDA's logit at position i predicts token i, so its
diffusion phase reads the same network unshifted; the causal phase is the same for both.

The reward models learn the ground truth from Bradley–Terry preference pairs with near-miss negatives and some
flipped labels, and training stops as soon as they order 92% of clean validation pairs correctly: they agree with
the ground truth on most held-out pairs but not all, and they never saw an ill-formed response
(`rgrl.toy.world.preference_pairs`), which leaves room for reward hacking.

`build(out_dir)` writes every checkpoint as an ordinary model directory (config.json, model.safetensors, tokenizer
with chat template), each into a temporary directory first and then renamed into place, plus the prompts and a
report of what was measured. Fixed seeds and deterministic kernels make the result a function of the code and
the torch build (the CPU thread count is fixed too, because it can change float summation order).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedTokenizerFast

import rgrl.models  # noqa: F401  (registers the native Dream and LLaDA classes)
from rgrl.guidance import GuidanceConfig, RewardGuidance
from rgrl.models.family import LLAMA3_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, DiffusionFamily, resolve_family
from rgrl.models.loading import architecture_config
from rgrl.rewards import RewardModel, RewardTemplate, VocabBridge
from rgrl.sampling import DiffusionSampler, SamplerConfig
from rgrl.toy import SHIPPED_CHECKPOINTS, world
from rgrl.toy.tiny import RM_CHAT_TEMPLATE, padded_rows, train_byte_level_bpe, wrap_tokenizer
from rgrl.trainers.likelihood import completion_log_probs, draw_noise, sequence_log_likelihood, token_weights

logger = logging.getLogger("rgrl.toy")

DEFAULT_OUT = SHIPPED_CHECKPOINTS
CHECKPOINTS = ("dream", "llada", "rm", "rm_llada")
FAMILY_RM = {"dream": "rm", "llada": "rm_llada"}  # each dLLM is measured and guided with its reward model
PROMPTS_FILE = "prompts.jsonl"
REPORT_FILE = "build_report.json"
# Words the rm_llada tokenizer never saw whole (a pool word, a topic noun, a filler): the bridge splits them.
RM_LLADA_HELD_OUT_WORDS = ("ladder", "fog", "chair")
UNK_TOKEN = "<|unk|>"
GUIDED_EVALS = ("entrgi", "aps")


def sampler_config(**overrides) -> SamplerConfig:
    """The sampler settings the toy world is measured with: the paper's test-time settings (τ = 0.7, top-p 0.95,
    entropy confidence, EOS revealed last, Dream schedule) at T = L = 16."""
    settings = dict(steps=world.RESPONSE_TOKENS, max_completion_length=world.RESPONSE_TOKENS, temperature=0.7,
                    top_p=0.95, alg="entropy", deprioritize_eos=True)
    return SamplerConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class DLLMTraining:
    """Size and training schedule of a toy dLLM."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 1200
    causal_fraction: float = 0.4  # the first part of the steps is causal next-token training
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    corpus_size: int = 100_000


@dataclass
class RMTraining:
    """Size and Bradley–Terry training of a toy reward model."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 1500  # at most; training stops once the validation accuracy reaches target_accuracy
    target_accuracy: float = 0.92  # imperfect on purpose, so that reward hacking can show
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    num_pairs: int = 8000
    hard_fraction: float = 0.5  # near-miss negatives (world.preference_pairs)
    degenerate_fraction: float = 0.0  # ill-formed negatives (world.degenerate); > 0 makes a robust reward model
    label_noise: float = 0.05
    validation_pairs: int = 500
    eval_pairs: int = 1000  # held-out pairs for the reported accuracy


# The knobs' named settings (python -m rgrl.toy build --difficulty/--entropy/--robust-rm). The difficulty levels aim
# at sampled pass rates of about 0.45, 0.15 and 0.05 (the targets), calibrated on real builds of world seed 0
# (Dream dLLM, low entropy, 1 thread, 600 samples at τ = 0.7, top-p 0.95; docs/results/README.md):
#
#     uses_word        0.08   0.14   0.16   0.17   0.18   0.20   0.40 (shipped, 2 threads)
#     sampled pass     0.000  0.000  0.005  0.030  0.130  0.180  0.443
#
# The rate is a cliff, not a curve: below about 0.16 the dLLM does not learn to copy the prompt's word into the
# response (it spreads the word's corpus share over all pool words, each then under the top-p cut), above about 0.18
# it does. `hard` was 0.08 until this calibration (0.000: no sample ever passes).
DIFFICULTY = {"easy": 0.4, "medium": 0.18, "hard": 0.17}  # world.WorldConfig.uses_word
ENTROPY = {"low": 1, "mid": 2, "high": 4}  # world.WorldConfig.synonyms
ROBUST_RM_DEGENERATE_FRACTION = 0.3  # RMTraining.degenerate_fraction of --robust-rm


@dataclass
class BuildConfig:
    dllm: DLLMTraining = field(default_factory=DLLMTraining)
    rm: RMTraining = field(default_factory=RMTraining)
    seed: int = 0
    eval_samples: int = 600  # sampled completions graded per dLLM (the world's prompts in turn)
    guided_eval: bool = True  # also measure guided pass rates (GUIDED_EVALS, M = 1, η = 0.5)
    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    checkpoints: tuple[str, ...] = CHECKPOINTS  # what to build; a guided_eval needs the dLLM's RM (FAMILY_RM)
    threads: int = 2  # CPU threads; part of the result (summation order). 1 is much faster on a loaded machine

    def __post_init__(self):
        if not self.checkpoints or not set(self.checkpoints) <= set(CHECKPOINTS):
            raise ValueError(f"checkpoints must be a non-empty subset of {CHECKPOINTS}, got {self.checkpoints}.")
        for dllm, rm in FAMILY_RM.items():
            if self.guided_eval and dllm in self.checkpoints and rm not in self.checkpoints:
                raise ValueError(f"The guided evaluation of {dllm!r} needs its reward model {rm!r}: build both, or "
                                 "turn guided_eval off (the dLLM is then measured by the ground truth alone).")

    @classmethod
    def quick(cls) -> BuildConfig:
        """A reduced world for smoke tests: narrow models, few steps; the numbers it measures mean nothing."""
        return cls(
            dllm=DLLMTraining(hidden_size=32, intermediate_size=64, num_heads=2, steps=40, batch_size=32,
                              warmup_steps=5, corpus_size=2000),
            rm=RMTraining(hidden_size=16, intermediate_size=32, num_heads=2, steps=20, batch_size=32, warmup_steps=2,
                          num_pairs=640, validation_pairs=100, eval_pairs=200),
            eval_samples=32,
            guided_eval=False,
        )


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def _word_level_tokenizer(vocabulary: list[str], specials: list[str], chat_template: str,
                          **special_tokens) -> PreTrainedTokenizerFast:
    """A word-level tokenizer in byte-level clothing: the GPT-2 pre-tokenizer splits text into words ('Ġcat' is
    " cat"), each known word is one id, anything else is the unknown token. Decoding joins the words' bytes."""
    model = models.WordLevel({token: i for i, token in enumerate(vocabulary + [UNK_TOKEN])}, unk_token=UNK_TOKEN)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return wrap_tokenizer(tokenizer, specials, chat_template, unk_token=UNK_TOKEN, **special_tokens)


def _lexicon(world_config: world.WorldConfig, exclude: tuple[str, ...] = ()) -> str:
    """One text holding every response word in the forms responses use: "the" first, then " word" (the other
    determiners also start responses: `_world_words` adds those forms)."""
    words = {*world_config.nouns, *world_config.verbs, *world_config.determiners[1:], "and"}
    return "the " + " ".join(sorted(words - set(exclude)))


def _world_words(make_tokenizer, world_config: world.WorldConfig) -> list[str]:
    """Every pre-token of the world's conversations rendered with the tokenizer's chat template (sorted)."""
    tokenizer = make_tokenizer([])
    lexicon = _lexicon(world_config)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": instruction.text},
                                            {"role": "assistant", "content": lexicon}], tokenize=False)
             for instruction in world.all_instructions()]
    specials = re.compile("|".join(re.escape(t.content) for t in tokenizer.added_tokens_decoder.values()))
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    words = {word for text in texts for piece in specials.split(text)
             for word, _ in pre_tokenizer.pre_tokenize_str(piece)}
    return sorted(words | set(world_config.determiners[1:]))  # a response's first word has no leading space


def build_tokenizer(name: str, seed: int = 0, world_config: world.WorldConfig = world.SHIPPED_WORLD
                    ) -> PreTrainedTokenizerFast:
    """The tokenizer of toy checkpoint `name` ("dream" and "rm" share one) for a world (its words)."""
    if name in ("dream", "rm"):
        def make(words):
            return _word_level_tokenizer(
                words, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
                QWEN_CHAT_TEMPLATE, bos_token="<|beginoftext|>", eos_token="<|endoftext|>",
                pad_token="<|endoftext|>", mask_token="<|mask|>")
        return make(_world_words(make, world_config))
    if name == "llada":
        def make(words):
            return _word_level_tokenizer(
                words, ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|mdm_mask|>"],
                LLAMA3_CHAT_TEMPLATE, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                pad_token="<|endoftext|>")
        words = _world_words(make, world_config)
        random.Random(seed).shuffle(words)  # other ids than Dream's for the same words
        return make(words)
    if name == "rm_llada":
        specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
        prompts = [i.text for i in world.all_instructions() if i.word not in RM_LLADA_HELD_OUT_WORDS]
        texts = prompts + [_lexicon(world_config, exclude=RM_LLADA_HELD_OUT_WORDS), "system user assistant",
                           *world_config.determiners[1:]]
        # enough merges for every remaining word to be one token
        base = train_byte_level_bpe(texts, vocab_size=2000, leading_specials=specials)
        return wrap_tokenizer(base, [], RM_CHAT_TEMPLATE, eos_token="<|end|>", pad_token="<|pad|>")
    raise ValueError(f"Unknown toy checkpoint {name!r}; expected one of {CHECKPOINTS}.")


# ---------------------------------------------------------------------------------------------------------------
# Models


def model_config(name: str, tokenizer, dllm: DLLMTraining, rm: RMTraining):
    """Config of toy checkpoint `name`: the real checkpoint's config with toy dimensions."""
    rows, eos, pad = padded_rows(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    max_positions = 256
    if name == "dream":
        return architecture_config(
            "dream-v0-instruct-7b", vocab_size=rows, hidden_size=dllm.hidden_size,
            intermediate_size=dllm.intermediate_size, num_hidden_layers=dllm.num_layers,
            num_attention_heads=dllm.num_heads, num_key_value_heads=dllm.num_heads, max_window_layers=dllm.num_layers,
            max_position_embeddings=max_positions, rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    if name == "llada":
        return architecture_config(
            "llada-8b-instruct", vocab_size=rows, embedding_size=rows, d_model=dllm.hidden_size,
            n_heads=dllm.num_heads, n_kv_heads=dllm.num_heads, n_layers=dllm.num_layers,
            mlp_hidden_size=dllm.intermediate_size, max_sequence_length=max_positions, rope_theta=10000.0,
            mask_token_id=tokenizer.convert_tokens_to_ids("<|mdm_mask|>"), eos_token_id=eos, pad_token_id=pad)
    if name in ("rm", "rm_llada"):
        return architecture_config(
            "skywork-reward-v2-qwen3-0.6b", vocab_size=rows, hidden_size=rm.hidden_size,
            intermediate_size=rm.intermediate_size, num_hidden_layers=rm.num_layers, num_attention_heads=rm.num_heads,
            num_key_value_heads=rm.num_heads, head_dim=rm.hidden_size // rm.num_heads, max_window_layers=rm.num_layers,
            max_position_embeddings=max_positions, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos, pad_token_id=pad)
    raise ValueError(f"Unknown toy checkpoint {name!r}; expected one of {CHECKPOINTS}.")


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model, batch_loss, steps: int, lr: float, warmup_steps: int, weight_decay: float = 0.01,
        stop=None, desc: str = "train", log_every: int = 50) -> list[float]:
    """Minimise `batch_loss(step)` with AdamW (no decay on norms and biases), linear warmup then cosine decay over
    `steps`, gradients clipped at norm 1. Every `log_every` steps the mean loss is recorded and, if given,
    `stop()` is asked whether to end early. Returns the recorded losses; leaves the model in eval mode."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, steps, warmup_steps))
    curve, running = [], 0.0
    progress = tqdm(range(steps), desc=desc, unit="step", mininterval=2)
    for step in progress:
        model.train()
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append(running / (step % log_every + 1))
            running = 0.0
            progress.set_postfix(loss=f"{curve[-1]:.3f}")
            model.eval()
            if stop is not None and stop():
                break
    model.eval()
    return curve


@dataclass
class EncodedCorpus:
    """Tokenized (prompt, response) pairs: prompt_ids/prompt_mask [N, P] left-padded, response_ids [N, R] (the
    response's tokens, then EOS up to R = world.RESPONSE_TOKENS)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor


def encode_corpus(examples: list[tuple[str, str]], tokenizer, family: DiffusionFamily) -> EncodedCorpus:
    """Prompts rendered with the chat template and left-padded as the sampler does; responses padded with EOS."""
    prompts = sorted({prompt for prompt, _ in examples})
    rendered = [family.render_prompt(tokenizer, prompt) for prompt in prompts]
    encoded = tokenizer(rendered, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    row_of = {prompt: i for i, prompt in enumerate(prompts)}
    rows = torch.tensor([row_of[prompt] for prompt, _ in examples])
    length = world.RESPONSE_TOKENS
    response_ids = torch.full((len(examples), length), family.eos_token_id, dtype=torch.long)
    for i, ids in enumerate(tokenizer([r for _, r in examples], add_special_tokens=False).input_ids):
        if len(ids) > length:
            raise ValueError(f"A response of {len(ids)} tokens does not fit the {length} completion slots.")
        response_ids[i, : len(ids)] = torch.tensor(ids)
    return EncodedCorpus(encoded.input_ids[rows], encoded.attention_mask[rows].bool(), response_ids)


def _causal_mask(prompt_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[B, P] prompt padding mask -> [B, 1, P+R, P+R] bool: attend to real tokens at or before the query (and
    always to itself, so that pad rows are not empty)."""
    keys = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], length)], dim=1)
    total = keys.shape[1]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return (causal & keys[:, None, None, :]) | torch.eye(total, dtype=torch.bool)


def dllm_loss(model, family: DiffusionFamily, prompt_ids, prompt_mask, response_ids, causal: bool,
              generator: torch.Generator) -> torch.Tensor:
    """Loss of one batch on the response tokens ([B, P] prompts, [B, R] responses).

    causal: next-token cross-entropy under a causal mask, reading the logit at position i as the prediction of
        token i+1 (for both families).
    otherwise: the masked-diffusion ELBO of the learners (`rgrl.trainers.likelihood`, estimator "elbo", prompts
        never masked): each row draws t ~ U(eps, 1) and masks each response token with probability t;
        loss = mean over rows of Σ_masked CE / t / R (LLaDA's SFT estimator). The family's alignment reads the
        logits (Dream shifted, LLaDA not).
    """
    batch, length = response_ids.shape
    start = prompt_ids.shape[1]
    if causal:
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        logits = model(input_ids=ids, attention_mask=_causal_mask(prompt_mask, length)).logits[:, start - 1 : -1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), response_ids.reshape(-1))
    noise = {key: value[:, 0] for key, value in draw_noise(prompt_mask, length, p_mask_prompt=0.0, estimator="elbo",
                                                            generator=generator).items()}
    log_probs = completion_log_probs(model, family, prompt_ids, prompt_mask, response_ids, noise["prompt_noise"],
                                     noise["completion_noise"])
    every_token = torch.ones_like(response_ids, dtype=torch.bool)  # EOS padding is a target too
    weights = token_weights(every_token, noise["completion_noise"], noise["mask_rate"])
    return -sequence_log_likelihood(log_probs, weights, every_token).mean()


def train_dllm(model, tokenizer, family: DiffusionFamily, settings: DLLMTraining, seed: int,
               desc: str = "dLLM", world_config: world.WorldConfig = world.SHIPPED_WORLD) -> list[float]:
    """Train on the base-behaviour corpus: causal warm start, then masked diffusion. Returns the loss curve."""
    corpus = encode_corpus(world.corpus(settings.corpus_size, seed=seed, world=world_config), tokenizer, family)
    generator = torch.Generator().manual_seed(seed)
    causal_steps = round(settings.causal_fraction * settings.steps)

    def batch_loss(step: int) -> torch.Tensor:
        rows = torch.randint(0, len(corpus.response_ids), (settings.batch_size,), generator=generator)
        return dllm_loss(model, family, corpus.prompt_ids[rows], corpus.prompt_mask[rows],
                         corpus.response_ids[rows], causal=step < causal_steps, generator=generator)

    return fit(model, batch_loss, settings.steps, settings.lr, settings.warmup_steps, settings.weight_decay,
               desc=desc)


def _conversation_batch(template, pad_id: int, prompts: list[str], responses: list[str]):
    """Right-padded RM input ids and mask [B, T], the way `RewardModel.score` builds them."""
    sequences = [template.conversation_ids(p, r) for p, r in zip(prompts, responses)]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    return ids, mask


@dataclass
class RMTrainingResult:
    loss_curve: list[float]
    steps: int  # taken, at most RMTraining.steps
    validation_accuracy: float


def validation_pairs(settings: RMTraining, seed: int, world_config: world.WorldConfig) -> list[tuple[str, str, str]]:
    """The clean pairs whose accuracy stops reward-model training: well-formed responses only, with or without
    degenerate training negatives. A robust reward model then stops at the same accuracy on well-formed pairs as a
    standard one and differs from it only in what it learnt about ill-formed responses (with degenerate validation
    pairs, which it soon orders right, it would stop sooner and less accurate on well-formed ones)."""
    return world.preference_pairs(settings.validation_pairs, seed=seed + 1, hard_fraction=settings.hard_fraction,
                                  world=world_config)


def train_reward_model(model, tokenizer, settings: RMTraining, seed: int, desc: str = "RM",
                       world_config: world.WorldConfig = world.SHIPPED_WORLD) -> RMTrainingResult:
    """Bradley–Terry on noisy ground-truth preference pairs, loss = −log σ(r(chosen) − r(rejected)), stopped as
    soon as the accuracy on clean validation pairs reaches `settings.target_accuracy`."""
    template = RewardTemplate(tokenizer, pad_token_id=model.config.pad_token_id)

    def encode(pairs):
        """[2N, T] ids and mask: the N chosen conversations, then the N rejected ones (one padding width)."""
        prompts = [p for p, _, _ in pairs]
        return _conversation_batch(template, model.config.pad_token_id, prompts + prompts,
                                   [c for _, c, _ in pairs] + [r for _, _, r in pairs])

    ids, mask = encode(world.preference_pairs(settings.num_pairs, seed=seed, hard_fraction=settings.hard_fraction,
                                              label_noise=settings.label_noise,
                                              degenerate_fraction=settings.degenerate_fraction, world=world_config))
    val_ids, val_mask = encode(validation_pairs(settings, seed, world_config))
    num_pairs, generator = settings.num_pairs, torch.Generator().manual_seed(seed)
    steps, accuracy = 0, 0.0

    def batch_loss(step: int) -> torch.Tensor:
        nonlocal steps
        steps = step + 1
        rows = torch.randint(0, num_pairs, (settings.batch_size,), generator=generator)
        scores = model(input_ids=ids[torch.cat([rows, rows + num_pairs])],
                       attention_mask=mask[torch.cat([rows, rows + num_pairs])]).logits[:, 0].float()
        return -F.logsigmoid(scores[: len(rows)] - scores[len(rows):]).mean()

    def reached_target() -> bool:
        nonlocal accuracy
        with torch.no_grad():
            scores = model(input_ids=val_ids, attention_mask=val_mask).logits[:, 0]
        accuracy = (scores[: len(scores) // 2] > scores[len(scores) // 2 :]).float().mean().item()
        return accuracy >= settings.target_accuracy

    curve = fit(model, batch_loss, settings.steps, settings.lr, settings.warmup_steps, stop=reached_target,
                desc=desc)
    return RMTrainingResult(loss_curve=curve, steps=steps, validation_accuracy=accuracy)


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def pairwise_accuracy(reward_model: RewardModel, num_pairs: int, seed: int,
                      world_config: world.WorldConfig = world.SHIPPED_WORLD, degenerate_fraction: float = 0.0) -> float:
    """Fraction of held-out ground-truth pairs (no label noise) the reward model orders correctly; with
    `degenerate_fraction` 1, pairs of a passing response and an ill-formed variant of it."""
    pairs = world.preference_pairs(num_pairs, seed=seed, degenerate_fraction=degenerate_fraction, world=world_config)
    prompts = [p for p, _, _ in pairs]
    chosen = reward_model.score(prompts, [c for _, c, _ in pairs], batch_size=256)
    rejected = reward_model.score(prompts, [r for _, _, r in pairs], batch_size=256)
    return (chosen > rejected).float().mean().item()


@dataclass
class SampleQuality:
    """Ground truth and reward of sampled completions."""

    pass_rate: float
    well_formed: float
    on_topic: float
    uses_word: float
    reward: float | None = None
    seconds: float = 0.0
    entropy_weight: float | None = None  # guided: mean EntRGi weight w = H / log V of the proposals


def sample_quality(model, tokenizer, family: DiffusionFamily, prompts: list[str], seed: int,
                   reward_model: RewardModel | None = None, guidance: RewardGuidance | None = None,
                   batch_size: int = 150, **sampler_overrides) -> SampleQuality:
    """Sample one completion per prompt with `sampler_config()` and grade it (optionally reward-guided)."""
    sampler = DiffusionSampler(model, tokenizer, family, sampler_config(**sampler_overrides), guidance)
    texts, seconds, weight_sum, guided_steps = [], 0.0, 0.0, 0
    for start in range(0, len(prompts), batch_size):
        out = sampler.generate(prompts[start : start + batch_size], seed=seed + start)
        texts += out.texts
        seconds += out.stats.seconds
        weight_sum += out.stats.guidance.entropy_weight_sum
        guided_steps += out.stats.guidance.steps
    checks = [world.check(world.parse_instruction(p), t) for p, t in zip(prompts, texts)]
    reward = None
    if reward_model is not None:
        reward = reward_model.score(prompts, texts, batch_size=256).mean().item()
    return SampleQuality(pass_rate=fmean(c.passed for c in checks), well_formed=fmean(c.well_formed for c in checks),
                         on_topic=fmean(c.on_topic for c in checks), uses_word=fmean(c.uses_word for c in checks),
                         reward=reward, seconds=seconds,
                         entropy_weight=weight_sum / guided_steps if guided_steps else None)


# ---------------------------------------------------------------------------------------------------------------
# The build


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _publish(staging: Path, target: Path) -> None:
    """Move a finished file or directory into place; readers never see a half-written one."""
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_prompts(path: Path) -> None:
    """The world's prompts, one JSON object per line: {"prompt": str, "topic": str, "word": str}."""
    with open(path, "w") as f:
        for instruction in world.all_instructions():
            f.write(json.dumps({"prompt": instruction.text, "topic": instruction.topic, "word": instruction.word})
                    + "\n")


class _Deterministic:
    """Fixed thread count and deterministic kernels for the duration of a build."""

    def __init__(self, threads: int):
        self.build_threads = threads

    def __enter__(self):
        self.threads, self.deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.build_threads)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic)


def build(out_dir: str | os.PathLike = DEFAULT_OUT, quick: bool = False, config: BuildConfig | None = None) -> dict:
    """Build the toy world into `out_dir` (`config.checkpoints`, by default all four: dream/, llada/, rm/,
    rm_llada/; plus prompts.jsonl and build_report.json) and return the report."""
    config = config or (BuildConfig.quick() if quick else BuildConfig())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": asdict(config), "torch": torch.__version__, "checkpoints": {}}
    started = time.perf_counter()
    prompts = [i.text for i in world.all_instructions()]
    eval_prompts = [prompts[i % len(prompts)] for i in range(config.eval_samples)]
    reward_model_names = [name for name in ("rm", "rm_llada") if name in config.checkpoints]
    with _Deterministic(config.threads), tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as staging:
        staging = Path(staging)
        write_prompts(staging / PROMPTS_FILE)

        reward_models = {}
        for name in reward_model_names:
            t0 = time.perf_counter()
            tokenizer = build_tokenizer(name, seed=config.seed, world_config=config.world)
            torch.manual_seed(config.seed)
            model = AutoModelForSequenceClassification.from_config(
                model_config(name, tokenizer, config.dllm, config.rm), dtype=torch.float32)
            trained = train_reward_model(model, tokenizer, config.rm, seed=config.seed, desc=name,
                                         world_config=config.world)
            _save(model, tokenizer, staging / name)
            reward_models[name] = RewardModel(model, tokenizer)
            accuracy = pairwise_accuracy(reward_models[name], config.rm.eval_pairs, seed=config.seed + 1000,
                                         world_config=config.world)
            degenerate_accuracy = pairwise_accuracy(reward_models[name], config.rm.eval_pairs,
                                                    seed=config.seed + 2000, world_config=config.world,
                                                    degenerate_fraction=1.0)
            report["checkpoints"][name] = {"parameters": model.num_parameters(), "vocab_rows": padded_rows(tokenizer),
                                           "heldout_pair_accuracy": accuracy,
                                           "degenerate_pair_accuracy": degenerate_accuracy, **asdict(trained),
                                           "seconds": time.perf_counter() - t0}
            logger.info(f"{name}: held-out pairwise accuracy {accuracy:.3f}, against ill-formed variants "
                        f"{degenerate_accuracy:.3f}")

        for name in (dllm for dllm in FAMILY_RM if dllm in config.checkpoints):
            rm_name = FAMILY_RM[name]
            t0 = time.perf_counter()
            tokenizer = build_tokenizer(name, seed=config.seed, world_config=config.world)
            torch.manual_seed(config.seed)
            model = AutoModel.from_config(model_config(name, tokenizer, config.dllm, config.rm), dtype=torch.float32)
            family = resolve_family(model.config, tokenizer)
            curve = train_dllm(model, tokenizer, family, config.dllm, seed=config.seed, desc=name,
                               world_config=config.world)
            _save(model, tokenizer, staging / name)
            reward_model = reward_models.get(rm_name)  # None: measured by the ground truth alone
            entry = {"parameters": model.num_parameters(), "vocab_rows": model.config.vocab_size, "loss_curve": curve}
            if reward_model is not None:
                bridge = VocabBridge(tokenizer, reward_model.tokenizer, num_rows=model.config.vocab_size)
                entry["bridge"] = bridge.summary()
            base = sample_quality(model, tokenizer, family, eval_prompts, seed=config.seed, reward_model=reward_model)
            entry["base"] = asdict(base)
            message = f"{name}: sampled pass rate {base.pass_rate:.3f}"
            for method in GUIDED_EVALS if config.guided_eval else ():
                guidance = RewardGuidance(GuidanceConfig(method=method, steps=1, lr=0.5), reward_model, bridge,
                                          family.stop_token_ids)
                guided = sample_quality(model, tokenizer, family, eval_prompts, seed=config.seed,
                                        reward_model=reward_model, guidance=guidance)
                entry[f"{method}_m1"] = asdict(guided)
                message += f", {method} (M=1) {guided.pass_rate:.3f}"
            entry["seconds"] = time.perf_counter() - t0
            report["checkpoints"][name] = entry
            logger.info(message)

        report["seconds"] = time.perf_counter() - started
        report["sampler"] = asdict(sampler_config())
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for name in (*config.checkpoints, PROMPTS_FILE, REPORT_FILE):
            _publish(staging / name, out_dir / name)
    return report
