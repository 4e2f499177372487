"""RewardModel: loading checks, discrete scoring, and the differentiable embedding path (exact against scoring)."""

import copy

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForSequenceClassification

from rgrl.models.loading import DLLMConfig, resolve_checkpoint
from rgrl.toy.tiny import build_tokenizer
from rgrl.rewards import RewardModel, RewardModelConfig, RewardTemplate, TemplateError

PROMPTS = [
    "Hi",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the cat and the teacher who paints old maps every morning."},
    ],
    "What does my friend like?",
]
COMPLETIONS = ["The cat likes warm tea.", "A dog found a letter.", "Our team writes about the garden today!"]
NUM_SLOTS = 12


@pytest.fixture(scope="module", params=["rm", "rm_mismatched"])
def reward_model(request):
    return RewardModel.from_pretrained(f"tiny:{request.param}", dtype="float32")


def response_slots(reward_model, completions, num_slots=NUM_SLOTS):
    """RM token ids of each completion in `num_slots` slots (keep marks the real ones) and their embeddings."""
    ids = torch.zeros(len(completions), num_slots, dtype=torch.long)
    keep = torch.zeros(len(completions), num_slots, dtype=torch.bool)
    for row, completion in enumerate(completions):
        tokens = reward_model.tokenizer(completion, add_special_tokens=False).input_ids
        ids[row, : len(tokens)] = torch.tensor(tokens)
        keep[row, : len(tokens)] = True
    return reward_model.input_embeddings.weight[ids].detach().clone(), keep


def direct_score(reward_model, ids):
    """Naive reference: one unpadded sequence of ids straight through the classifier."""
    with torch.no_grad():
        return reward_model.model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_rejects_more_than_one_label(tmp_path):
    source = AutoModelForSequenceClassification.from_pretrained(resolve_checkpoint("tiny:rm"))
    source.config.num_labels = 2
    source.config.save_pretrained(tmp_path)  # config only: the check must come before any weight loading
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel.from_pretrained(str(tmp_path))
    two_labels = AutoModelForSequenceClassification.from_config(source.config)
    with pytest.raises(ValueError, match="exactly one label"):
        RewardModel(two_labels, None)


def test_frozen_eval_and_dtype():
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="bfloat16")
    assert not reward_model.model.training
    assert not any(p.requires_grad for p in reward_model.model.parameters())
    assert reward_model.dtype == torch.bfloat16
    scores = reward_model.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    embeds, keep = response_slots(reward_model, COMPLETIONS)
    rewards = reward_model.embedding_scorer(PROMPTS, NUM_SLOTS)(embeds.float().requires_grad_(True), keep)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, scores, atol=0.05, rtol=0.05)  # bf16 vs bf16, different kernels


def test_score_matches_direct_and_is_batch_independent(reward_model):
    scores = reward_model.score(PROMPTS, COMPLETIONS, batch_size=3)
    one_by_one = torch.cat([reward_model.score([p], [c]) for p, c in zip(PROMPTS, COMPLETIONS)])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, reward_model.score(PROMPTS, COMPLETIONS, batch_size=2), atol=1e-5, rtol=0)
    assert torch.equal(scores, reward_model.score(PROMPTS, COMPLETIONS, batch_size=3))  # deterministic
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        ids = reward_model.template.conversation_ids(prompt, completion)
        assert score.item() == pytest.approx(direct_score(reward_model, ids), abs=1e-5)
    assert len(set(scores.tolist())) == 3


def test_score_renders_the_rm_template(reward_model):
    text = reward_model.template.render(PROMPTS[1], COMPLETIONS[1])
    expected = reward_model.tokenizer.apply_chat_template(
        PROMPTS[1] + [{"role": "assistant", "content": COMPLETIONS[1]}], tokenize=False
    )
    assert text == expected and "Be brief." in text and COMPLETIONS[1] in text
    with pytest.raises(TemplateError, match="end with a user turn"):
        reward_model.score([[{"role": "assistant", "content": "x"}]], ["y"])


def test_truncation_keeps_the_end():
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="float32", max_length=16)
    ids = reward_model.template.conversation_ids(PROMPTS[1], COMPLETIONS[1])
    assert len(ids) > 16
    with pytest.warns(UserWarning, match="start is cut"):
        score = reward_model.score([PROMPTS[1]], [COMPLETIONS[1]])
    assert score.item() == pytest.approx(direct_score(reward_model, ids[-16:]), abs=1e-6)
    assert score.item() != pytest.approx(direct_score(reward_model, ids[:16]), abs=1e-4)


def test_embedding_scorer_equals_discrete_scoring(reward_model):
    """Prompts of different lengths in one batch; slots past each completion have keep=False."""
    for prompt, completion in zip(PROMPTS, COMPLETIONS):  # the precondition: the RM tokenizes the pieces alike
        prefix, suffix = reward_model.template.split_ids(prompt)
        tokens = reward_model.tokenizer(completion, add_special_tokens=False).input_ids
        assert reward_model.template.conversation_ids(prompt, completion) == prefix.tolist() + tokens + suffix.tolist()
    scorer = reward_model.embedding_scorer(PROMPTS, NUM_SLOTS)
    embeds, keep = response_slots(reward_model, COMPLETIONS)
    assert not keep.all(dim=1).any()  # every row has hidden slots
    rewards = scorer(embeds, keep)
    torch.testing.assert_close(rewards, reward_model.score(PROMPTS, COMPLETIONS), atol=1e-5, rtol=0)
    # Negative control: letting the RM see the hidden slots changes the rewards.
    assert (scorer(embeds, torch.ones_like(keep)) - rewards).abs().max() > 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gradients_finite_and_zero_at_hidden_slots(attn_implementation):
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="float32", attn_implementation=attn_implementation)
    scorer = reward_model.embedding_scorer(PROMPTS, NUM_SLOTS)
    embeds, keep = response_slots(reward_model, COMPLETIONS)
    keep[2] = False  # an empty response: the row is only prompt and template suffix
    embeds.requires_grad_(True)
    rewards = scorer(embeds, keep)
    rewards.sum().backward()
    assert torch.isfinite(rewards).all() and torch.isfinite(embeds.grad).all()
    assert (embeds.grad[~keep] == 0).all()
    assert (embeds.grad[keep].abs().sum(-1) > 0).all()
    empty = reward_model.score([PROMPTS[2]], [""])
    assert rewards[2].item() == pytest.approx(empty.item(), abs=1e-5)


def test_prompt_side_is_built_once_per_prompt():
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="float32")
    template = reward_model.template
    reward_model.embedding_scorer([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0]], NUM_SLOTS)
    assert (template.cache_misses, template.cache_hits) == (2, 2)
    reward_model.embedding_scorer([PROMPTS[1], PROMPTS[2]], NUM_SLOTS)
    assert (template.cache_misses, template.cache_hits) == (3, 3)


def test_scorer_cuts_long_prompts_like_discrete_scoring():
    """With max_length too small for the prompt, both paths keep the end (response slots all used)."""
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="float32", max_length=24)
    completion = "A dog found a letter."
    num_slots = len(reward_model.tokenizer(completion, add_special_tokens=False).input_ids)
    embeds, keep = response_slots(reward_model, [completion], num_slots)
    with pytest.warns(UserWarning, match="start of the prompt is cut"):
        scorer = reward_model.embedding_scorer([PROMPTS[1]], num_slots)
    with pytest.warns(UserWarning, match="start is cut"):
        expected = reward_model.score([PROMPTS[1]], [completion])
    assert scorer.base_mask.shape[1] == 24
    torch.testing.assert_close(scorer(embeds, keep), expected, atol=1e-5, rtol=0)


def test_scorer_checks_shapes(reward_model):
    scorer = reward_model.embedding_scorer(PROMPTS, NUM_SLOTS)
    embeds, keep = response_slots(reward_model, COMPLETIONS)
    with pytest.raises(ValueError, match="Expected response embeddings"):
        scorer(embeds[:, :-1], keep[:, :-1])


def test_template_suffix_ending_in_pad_is_pooled_like_input_ids():
    """HF classifiers given ids pool the last non-pad token; the embedding path must end at that same token."""
    loaded = RewardModel.from_pretrained("tiny:rm", dtype="float32")
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template += "{{- '<|endoftext|>' }}"  # the pad token of this RM
    reward_model = RewardModel(loaded.model, tokenizer)
    _, suffix = reward_model.template.split_ids(PROMPTS[0])
    assert suffix[-1] != reward_model.pad_token_id
    assert reward_model.template.conversation_ids(PROMPTS[0], "x")[-1] == reward_model.pad_token_id
    embeds, keep = response_slots(reward_model, COMPLETIONS)
    rewards = reward_model.embedding_scorer(PROMPTS, NUM_SLOTS)(embeds, keep)
    torch.testing.assert_close(rewards, reward_model.score(PROMPTS, COMPLETIONS), atol=1e-5, rtol=0)


def test_exactly_one_bos_for_tokenizers_that_add_one():
    tokenizer = build_tokenizer("llama3")  # its template writes the BOS token itself
    bos = tokenizer.bos_token_id
    assert RewardTemplate(tokenizer).bos_token_id is None  # this tokenizer adds none on its own
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    for writes_bos in (True, False):
        if not writes_bos:
            tokenizer.chat_template = tokenizer.chat_template.replace("bos_token + ", "")
        template = RewardTemplate(tokenizer)
        assert template.bos_token_id == bos
        ids = template.conversation_ids("hi", "yo")
        assert ids[0] == bos and ids.count(bos) == 1
        prefix, suffix = template.split_ids("hi")
        assert prefix[0] == bos and (prefix == bos).sum() == 1 and bos not in suffix.tolist()


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{%- for m in messages %}{{- m['role'] + ': ' + m['content'] | upper + '\\n' }}{%- endfor %}", "verbatim"),
        ("{%- for m in messages %}{{- m['role'] + ': ' + m['content'] }}{%- endfor %}", "writes nothing"),
    ],
)
def test_unusable_templates_are_reported(template, problem):
    tokenizer = build_tokenizer("qwen")
    tokenizer.chat_template = template
    with pytest.raises(TemplateError, match=problem):
        RewardTemplate(tokenizer).split_ids("hi")


@pytest.mark.parametrize("path", ["tiny:rm", "tiny:rm_mismatched"])
def test_the_prompt_prefix_cache_gives_the_uncached_scores_and_gradients(path):
    """A causal reward model's columns before the first response slot are run once per scorer; every call then runs
    only the rest against their keys/values — equal to running every column, values and gradients."""
    reward_model = RewardModelConfig(path=path, dtype="float32").load("cpu")
    prompts = ["Tell me about the ocean.", "Hi", "Write a long story about a dog and a cat please."]
    scorer = reward_model.embedding_scorer(prompts, 6)
    assert 0 < scorer.cached_columns <= int(scorer.slot_columns[:, 0].min())
    embeds = reward_model.input_embeddings(torch.randint(5, 100, (3, 6))).detach().requires_grad_(True)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    stop_slot = torch.tensor([3, 6, 1])
    cached = scorer(embeds, keep, stop_slot)
    (cached_grad,) = torch.autograd.grad(cached.sum(), embeds)
    scorer.prefix_cache = None  # every column again
    full = scorer(embeds, keep, stop_slot)
    (full_grad,) = torch.autograd.grad(full.sum(), embeds)
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached_grad, full_grad, atol=1e-6, rtol=0)


def test_a_bidirectional_model_is_never_prefix_cached():
    from rgrl.rewards.reward_model import _cache_argument

    dllm = DLLMConfig(path="tiny:dream", dtype="float32").load("cpu")  # its attention is not causal
    assert _cache_argument(dllm.model) is None
