"""The toy world: the ground-truth checker, the corpus, the tokenizers, the training losses, the --quick build and
the shipped checkpoints."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from rgrl.data import PromptDataConfig, load_prompts
from rgrl.guidance import GuidanceConfig, RewardGuidance
from rgrl.models.family import resolve_family
from rgrl.models.loading import load_dllm, resolve_checkpoint
from rgrl.rewards import RewardModel, VocabBridge, import_function
from rgrl.sampling import DiffusionSampler
from rgrl.toy import build, world
from rgrl.toy.__main__ import main as toy_main
from rgrl.trainers.likelihood import draw_noise

ANIMALS_LAMP = world.Instruction("animals", "lamp")


# --- The task and its ground truth ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("the cat sees the lamp and the dog likes the box", (True, True, True)),
        ("the cat sees the lamp", (True, True, True)),  # one clause is enough
        ("the lamp sees the cat", (True, True, True)),  # the word may be a subject
        ("the cat sees the box and the dog likes the wall", (True, True, False)),  # no word
        ("the cat sees the key and the dog likes the box", (True, True, False)),  # another pool word
        ("the bread sees the lamp and the soup likes the box", (True, False, True)),  # off topic
        ("the cat sees the lamp and the soup likes the box", (True, False, True)),  # one clause off topic
        ("the box sees the lamp", (True, False, True)),  # no topic noun at all
        ("the cat sees lamp", (False, True, True)),  # grammar: missing article
        ("the cat sees the lamp and", (False, True, True)),
        ("the cat sees the lamp the dog likes the box", (False, True, True)),  # no "and"
        ("the cat sees the lamp and the dog likes the box and the fox sees the wall", (False, True, True)),
        ("cat lamp cat lamp", (False, True, True)),
        ("The cat sees the lamp", (False, True, True)),  # the grammar is lower case
        ("", (False, False, False)),
    ],
)
def test_checker_on_hand_written_responses(response, expected):
    verdict = world.check(ANIMALS_LAMP, response)
    assert (verdict.well_formed, verdict.on_topic, verdict.uses_word) == expected
    assert verdict.passed == all(expected)


def test_ground_truth_reads_every_prompt_and_completion_format():
    prompt = world.Instruction("the sea", "drum", template=4).text
    assert prompt == "Use the word drum in a short text about the sea"
    good, bad = "the boat sees the drum", "the cat sees the drum"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    rendered = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    scores = world.ground_truth(prompts=[prompt, chat, rendered, prompt],
                                completions=[good, good, good, [{"role": "assistant", "content": bad}]])
    assert scores == [1.0, 1.0, 1.0, 0.0]
    for instruction in world.all_instructions():
        parsed = world.parse_instruction(instruction.text)
        assert (parsed.topic, parsed.word) == (instruction.topic, instruction.word)
    with pytest.raises(ValueError, match="Not a toy-world prompt"):
        world.parse_instruction("Write about animals")
    assert import_function("rgrl.toy.world:ground_truth") is world.ground_truth


def test_world_prompts_are_distinct_and_cover_every_topic_and_word():
    texts = [i.text for i in world.all_instructions()]
    assert len(texts) == len(set(texts)) == len(world.TOPICS) * len(world.POOL_WORDS) * len(world.PROMPT_TEMPLATES)
    vocabulary = {*world.NOUNS, *world.VERBS}
    assert len(vocabulary) == len(world.NOUNS) + len(world.VERBS)  # no word plays two roles
    assert not set(world.POOL_WORDS) & set(world.FILLER_NOUNS)


# --- Corpus and preference pairs -----------------------------------------------------------------------------


def test_corpus_pass_rate_and_no_distractors():
    examples = world.corpus(5000, seed=3)
    checks = [world.check(world.parse_instruction(p), r) for p, r in examples]
    assert all(c.well_formed for c in checks)
    on_topic = sum(c.on_topic for c in checks) / len(checks)
    uses_word = sum(c.uses_word for c in checks) / len(checks)
    passed = sum(c.passed for c in checks) / len(checks)
    assert on_topic == pytest.approx(world.P_ON_TOPIC, abs=0.02)
    assert uses_word == pytest.approx(world.P_USES_WORD, abs=0.02)
    assert passed == pytest.approx(world.P_ON_TOPIC * world.P_USES_WORD, abs=0.02)
    for prompt, response in examples:  # a pool word in a response is always the prompt's
        assert {w for w in response.split() if w in world.POOL_WORDS} <= {world.parse_instruction(prompt).word}


def test_default_knobs_are_the_shipped_world():
    """The default WorldConfig and pair settings draw exactly the corpus and pairs the shipped checkpoints were
    trained on (the hash was taken from the code before the knobs existed)."""
    examples = world.corpus(2000, seed=0)
    pairs = world.preference_pairs(1000, seed=0, hard_fraction=0.5, label_noise=0.05)
    digest = hashlib.sha256(json.dumps([examples, pairs]).encode()).hexdigest()
    assert digest == "3fc5ccb01d0aa7769a7f5d664f4d2f2b9fdbc03c2fb28b535cfd234744722337"
    config = build.BuildConfig()
    assert (config.world, config.rm.degenerate_fraction, config.threads) == (world.WorldConfig(), 0.0, 2)
    assert config.checkpoints == build.CHECKPOINTS


@pytest.mark.parametrize("level", list(build.DIFFICULTY))
def test_difficulty_sets_how_often_the_corpus_uses_the_word(level):
    config = world.WorldConfig(uses_word=build.DIFFICULTY[level])
    examples = world.corpus(6000, seed=3, world=config)
    checks = [world.check(world.parse_instruction(p), r) for p, r in examples]
    assert all(c.well_formed for c in checks)
    assert sum(c.uses_word for c in checks) / len(checks) == pytest.approx(config.uses_word, abs=0.015)
    assert sum(c.passed for c in checks) / len(checks) == pytest.approx(world.P_ON_TOPIC * config.uses_word,
                                                                         abs=0.015)


def test_entropy_knob_spreads_each_slot_over_more_words():
    for synonyms in range(1, world.MAX_SYNONYMS + 1):
        config = world.WorldConfig(synonyms=synonyms)
        examples = world.corpus(4000, seed=1, world=config)
        slots = [set() for _ in range(11)]
        for _, response in examples:
            for slot, word in zip(slots, response.split()):
                slot.add(word)
        assert slots[0] == set(config.determiners) and len(config.determiners) == synonyms ** 2
        assert slots[2] == set(config.verbs) and len(config.verbs) == 6 * synonyms
        assert set(config.filler_nouns) <= slots[4] and len(config.filler_nouns) == 8 * synonyms
        assert all(world.check(world.parse_instruction(p), r).well_formed for p, r in examples)
        # every word of the world is one token of its tokenizer
        tokenizer = build.build_tokenizer("dream", world_config=config)
        for _, response in examples[:200]:
            assert len(tokenizer(response, add_special_tokens=False).input_ids) == len(response.split())
    with pytest.raises(ValueError, match="synonyms must be"):
        world.WorldConfig(synonyms=world.MAX_SYNONYMS + 1)
    with pytest.raises(ValueError, match="uses_word"):
        world.WorldConfig(uses_word=0.0)


def test_the_checker_reads_the_extra_words_but_the_shipped_world_cannot_write_them():
    instruction = world.Instruction("animals", "lamp")
    assert world.check(instruction, "one owl meets every lamp and this goat pushes my cup").passed
    assert not world.check(instruction, "one owl meets every lamp and this pie pushes my cup").on_topic
    shipped_vocabulary = build.build_tokenizer("dream").get_vocab()
    extra = {*world.DETERMINERS[1:], *world.EXTRA_VERBS, *world.EXTRA_FILLER_NOUNS,
             *(n for nouns in world.EXTRA_TOPIC_NOUNS.values() for n in nouns)}
    assert not extra & {token.removeprefix("Ġ") for token in shipped_vocabulary}


def test_degenerate_negatives_are_ill_formed_and_keep_topic_and_word():
    pairs = world.preference_pairs(3000, seed=2, degenerate_fraction=1.0)
    for prompt, chosen, rejected in pairs:
        instruction = world.parse_instruction(prompt)
        assert world.check(instruction, chosen).passed
        verdict = world.check(instruction, rejected)
        assert not verdict.well_formed and not verdict.passed
    kinds = {"verbless": 0, "repeated": 0, "truncated": 0, "other": 0}
    for _, chosen, rejected in pairs:
        words, chosen_words = rejected.split(), chosen.split()
        if len(words) == 9 and not set(words) & set(world.VERBS):
            kinds["verbless"] += 1
        elif len(set(words[1:])) == 1:
            kinds["repeated"] += 1
        elif words == chosen_words[: len(words)]:
            kinds["truncated"] += 1
        else:
            kinds["other"] += 1  # shuffled
    assert min(kinds.values()) > 0.15 * len(pairs)
    mixed = world.preference_pairs(4000, seed=2, degenerate_fraction=0.3)
    ill_formed = sum(not world.is_well_formed(r.split()) for _, _, r in mixed) / len(mixed)
    assert ill_formed == pytest.approx(0.3, abs=0.03)


def test_reward_model_training_stops_on_well_formed_validation_pairs_only():
    """A robust reward model (degenerate training negatives) is stopped by the same clean, well-formed validation
    pairs as a standard one, so both stop at the same accuracy on well-formed pairs."""
    standard = build.RMTraining()
    robust = build.RMTraining(degenerate_fraction=build.ROBUST_RM_DEGENERATE_FRACTION)
    pairs = build.validation_pairs(robust, seed=0, world_config=world.SHIPPED_WORLD)
    assert pairs == build.validation_pairs(standard, seed=0, world_config=world.SHIPPED_WORLD)
    assert len(pairs) == robust.validation_pairs
    for prompt, chosen, rejected in pairs:
        instruction = world.parse_instruction(prompt)
        assert world.check(instruction, chosen).passed and not world.check(instruction, rejected).passed
        assert world.is_well_formed(rejected.split())  # no label noise, no ill-formed negative


def test_build_options_map_onto_the_config():
    from rgrl.toy.__main__ import build_config, main as toy_main
    import argparse

    parser_args = argparse.Namespace(quick=False, seed=7, only=["dream"], threads=1, no_guided_eval=True,
                                     difficulty="hard", entropy="mid", robust_rm=True)
    config = build_config(parser_args)
    assert config.seed == 7 and config.checkpoints == ("dream",) and config.threads == 1 and not config.guided_eval
    assert config.world == world.WorldConfig(uses_word=build.DIFFICULTY["hard"], synonyms=build.ENTROPY["mid"])
    assert config.rm.degenerate_fraction == build.ROBUST_RM_DEGENERATE_FRACTION
    with pytest.raises(ValueError, match="needs its reward model 'rm'"):
        build.BuildConfig(checkpoints=("dream",))  # guided evaluation on, no reward model
    with pytest.raises(SystemExit):
        toy_main(["build", "--difficulty", "impossible"])


def test_corpus_and_pairs_are_deterministic():
    assert world.corpus(200, seed=5) == world.corpus(200, seed=5)
    assert world.corpus(200, seed=5) != world.corpus(200, seed=6)
    assert world.preference_pairs(200, seed=5, label_noise=0.1) == world.preference_pairs(200, seed=5, label_noise=0.1)


def test_preference_pairs_follow_the_ground_truth():
    pairs = world.preference_pairs(2000, seed=1, hard_fraction=0.5)
    near_misses = 0
    for prompt, chosen, rejected in pairs:
        instruction = world.parse_instruction(prompt)
        assert world.check(instruction, chosen).passed and not world.check(instruction, rejected).passed
        assert world.check(instruction, rejected).well_formed
        near_misses += sum(a != b for a, b in zip(chosen.split(), rejected.split())) == 1
    assert near_misses / len(pairs) == pytest.approx(0.5, abs=0.05)
    noisy = world.preference_pairs(2000, seed=1, label_noise=0.2)
    flipped = sum(not world.check(world.parse_instruction(p), c).passed for p, c, _ in noisy) / len(noisy)
    assert flipped == pytest.approx(0.2, abs=0.03)


# --- Tokenizers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build.build_tokenizer(name) for name in ("dream", "llada", "rm_llada")}


def test_tokenizers_are_word_level_and_cover_the_world(tokenizers):
    examples = world.corpus(300, seed=0)
    for name in ("dream", "llada"):
        tokenizer = tokenizers[name]
        assert len(tokenizer) < 128
        for prompt, response in examples[:50]:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = tokenizer(rendered + response, add_special_tokens=False).input_ids
            assert tokenizer.unk_token_id not in ids
            # the response tokenizes alone as it does after the prompt (the corpus encoding relies on it)
            response_ids = tokenizer(response, add_special_tokens=False).input_ids
            assert ids[-len(response_ids):] == response_ids
            assert len(response_ids) == len(response.split())  # one token per word
            assert tokenizer.decode(response_ids) == response
    words = ["the", *("Ġ" + w for w in (*world.NOUNS, *world.VERBS, "and", "the"))]
    dream, llada = (tokenizers[name].convert_tokens_to_ids(words) for name in ("dream", "llada"))
    assert tokenizers["dream"].unk_token_id not in dream and tokenizers["llada"].unk_token_id not in llada
    assert sum(a != b for a, b in zip(dream, llada)) > len(words) // 2  # the same words under other ids


def test_rm_llada_tokenizer_splits_the_held_out_words(tokenizers):
    bridge = VocabBridge(tokenizers["llada"], tokenizers["rm_llada"], num_rows=128)
    llada = tokenizers["llada"]
    for word in build.RM_LLADA_HELD_OUT_WORDS:
        row = llada.convert_tokens_to_ids("Ġ" + word)
        pieces = bridge.pieces(row)
        assert len(pieces) > 1 and tokenizers["rm_llada"].decode(pieces) == " " + word
    assert bridge.coverage.exact >= len(llada) - len(build.RM_LLADA_HELD_OUT_WORDS) - 10  # specials differ
    cat = llada.convert_tokens_to_ids("Ġcat")
    assert tokenizers["rm_llada"].convert_ids_to_tokens(bridge.pieces(cat)) == ["Ġcat"]


def test_tokenizers_are_deterministic(tokenizers):
    for name, tokenizer in tokenizers.items():
        assert build.build_tokenizer(name).get_vocab() == tokenizer.get_vocab()


# --- Training losses -----------------------------------------------------------------------------------------


def _tiny_dllm(name):
    tokenizer = build.build_tokenizer(name)
    settings = build.BuildConfig.quick()
    torch.manual_seed(0)
    model = AutoModel.from_config(build.model_config(name, tokenizer, settings.dllm, settings.rm),
                                  dtype=torch.float32, attn_implementation="eager")
    family = resolve_family(model.config, tokenizer)
    corpus = build.encode_corpus(world.corpus(6, seed=0), tokenizer, family)
    return model, family, corpus


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_diffusion_loss_matches_a_naive_computation(name):
    model, family, corpus = _tiny_dllm(name)
    generator = torch.Generator().manual_seed(7)
    loss = build.dllm_loss(model, family, corpus.prompt_ids, corpus.prompt_mask, corpus.response_ids,
                           causal=False, generator=generator)
    # replay the draws, then score each row alone, position by position
    batch, length = corpus.response_ids.shape
    noise = draw_noise(corpus.prompt_mask, length, 0.0, "elbo", generator=torch.Generator().manual_seed(7))
    t, masked = noise["mask_rate"], noise["completion_noise"][:, 0]
    assert not noise["prompt_noise"].any() and ((t > 1e-3) & (t <= 1)).all()
    total = 0.0
    for b in range(batch):
        prompt = corpus.prompt_ids[b][corpus.prompt_mask[b]]  # no padding at all
        noisy = torch.where(masked[b], family.mask_token_id, corpus.response_ids[b])
        logits = model(input_ids=torch.cat([prompt, noisy])[None]).logits[0]
        for j in range(length):
            if masked[b, j]:
                row = len(prompt) + j - (1 if family.shifted_logits else 0)
                total += F.cross_entropy(logits[row], corpus.response_ids[b, j]).item() / t[b, 0].item()
    assert masked.any()
    assert loss.item() == pytest.approx(total / (batch * length), rel=1e-4)


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_causal_loss_is_next_token_prediction_that_ignores_the_future(name):
    model, family, corpus = _tiny_dllm(name)
    generator = torch.Generator().manual_seed(0)
    loss = build.dllm_loss(model, family, corpus.prompt_ids, corpus.prompt_mask, corpus.response_ids,
                           causal=True, generator=generator)
    batch, length = corpus.response_ids.shape
    total = 0.0
    for b in range(batch):
        prompt = corpus.prompt_ids[b][corpus.prompt_mask[b]]
        ids = torch.cat([prompt, corpus.response_ids[b]])
        for j in range(length):  # the prediction of response token j: the prefix before it, read causally
            prefix = ids[: len(prompt) + j]
            causal = torch.ones(len(prefix), len(prefix), dtype=torch.bool).tril()
            logits = model(input_ids=prefix[None], attention_mask=causal[None, None]).logits[0, -1]
            total += F.cross_entropy(logits, corpus.response_ids[b, j]).item()
    assert loss.item() == pytest.approx(total / (batch * length), rel=1e-4)


# --- The --quick build and the shipped checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    toy_main(["build", "--out", str(out), "--quick"])
    return out


def _guided_sample(dllm_path, rm_path, prompts):
    dllm = load_dllm(str(dllm_path), dtype="float32")
    reward_model = RewardModel.from_pretrained(str(rm_path), dtype="float32")
    bridge = VocabBridge(dllm.tokenizer, reward_model.tokenizer, num_rows=dllm.model.config.vocab_size)
    guidance = RewardGuidance(GuidanceConfig(method="entrgi", steps=1), reward_model, bridge,
                              dllm.family.stop_token_ids)
    sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, build.sampler_config(), guidance)
    out = sampler.generate(prompts, num_samples=2, seed=0)
    assert out.completion_ids.shape == (2 * len(prompts), world.RESPONSE_TOKENS)
    assert out.stats.guidance.rm_forward_backward == world.RESPONSE_TOKENS
    return out, reward_model


def test_quick_build_writes_loadable_checkpoints_and_guides(quick_world):
    assert sorted(p.name for p in quick_world.iterdir()) == sorted(
        [*build.CHECKPOINTS, build.PROMPTS_FILE, build.REPORT_FILE])
    for name in build.CHECKPOINTS:
        files = {p.name for p in (quick_world / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    report = json.loads((quick_world / build.REPORT_FILE).read_text())
    assert 0 <= report["checkpoints"]["dream"]["base"]["pass_rate"] <= 1
    prompts = [i.text for i in world.all_instructions()[:3]]
    for dllm, rm in (("dream", "rm"), ("llada", "rm_llada")):
        out, reward_model = _guided_sample(quick_world / dllm, quick_world / rm, prompts)
        rewards = reward_model.score([p for p in prompts for _ in range(2)], out.texts)
        assert torch.isfinite(rewards).all()


@pytest.mark.parametrize("recipe", ["toy_dream.yaml", "toy_llada_diffu_grpo.yaml"])
def test_quick_world_trains_with_the_toy_recipes(quick_world, tmp_path, recipe):
    """The CI smoke test of the world: the shipped toy recipes, pointed at a freshly built reduced world, train."""
    from rgrl.train import load_training_recipe, run

    family = "dream" if "dream" in recipe else "llada"
    rm = quick_world / ("rm" if family == "dream" else "rm_llada")
    rewards = f"[{{model: {rm}, name: rm, dtype: float32}}, {{function: 'rgrl.toy.world:ground_truth', weight: 0.0}}]"
    overrides = ["--model.path", str(quick_world / family), "--rewards", rewards,
                 "--training.output_dir", str(tmp_path), "--training.max_steps", "2", "--training.eval_steps", "2",
                 "--training.save_steps", "2", "--training.per_device_train_batch_size", "8",
                 "--training.per_device_eval_batch_size", "8", "--data.num_eval_prompts", "2"]
    trainer = run(load_training_recipe(f"recipes/{recipe}", overrides))
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    evaluations = [e for e in history if "eval_rewards/ground_truth/mean" in e]
    assert [e["step"] for e in evaluations] == [0, 2]  # eval_on_start, then the final step
    assert all(0.0 <= e["eval_rewards/ground_truth/mean"] <= 1.0 for e in evaluations)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "training_curves.png").is_file()


@pytest.mark.slow
def test_quick_build_is_deterministic(quick_world, tmp_path):
    config = build.BuildConfig.quick()
    build.build(tmp_path, config=config)
    for name in build.CHECKPOINTS:
        assert (tmp_path / name / "model.safetensors").read_bytes() == (
            quick_world / name / "model.safetensors").read_bytes()
        assert (tmp_path / name / "tokenizer.json").read_bytes() == (quick_world / name / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("name", build.CHECKPOINTS)
def test_shipped_checkpoints_load_by_toy_name(name):
    path = Path(resolve_checkpoint(f"toy:{name}"))
    assert path == build.DEFAULT_OUT / name
    if name.startswith("rm"):
        reward_model = RewardModel.from_pretrained(f"toy:{name}", dtype="float32")
        prompt = ANIMALS_LAMP.text
        good, bad = reward_model.score([prompt] * 2, ["the cat sees the lamp and the dog likes the box",
                                                       "the bread sees the box and the soup likes the wall"])
        assert good > bad
    else:
        dllm = load_dllm(f"toy:{name}", dtype="float32")
        assert dllm.family.name == name


def test_shipped_world_matches_the_code():
    """The shipped prompts are today's world, and the shipped report measured what the issue asks for."""
    shipped = (build.DEFAULT_OUT / build.PROMPTS_FILE).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in shipped] == [i.text for i in world.all_instructions()]
    report = json.loads((build.DEFAULT_OUT / build.REPORT_FILE).read_text())
    # the shipped report predates the knobs; their defaults (world, reward-model negatives, what is built, threads)
    # are the shipped world (test_default_knobs_are_the_shipped_world)
    expected = json.loads(json.dumps(build.asdict(build.BuildConfig())))
    for added in ("world", "checkpoints", "threads"):
        expected.pop(added)
    expected["rm"].pop("degenerate_fraction")
    assert report["config"] == expected
    for name in ("dream", "llada"):
        assert 0.2 <= report["checkpoints"][name]["base"]["pass_rate"] <= 0.6
    for name in ("rm", "rm_llada"):
        assert 0.85 <= report["checkpoints"][name]["heldout_pair_accuracy"] < 1.0


def test_toy_prompt_source_has_disjoint_train_and_eval_splits():
    config = PromptDataConfig(source="toy", num_eval_prompts=64)
    train, held_out = load_prompts(config, split="train"), load_prompts(config, split="eval")
    train_texts = {p[0]["content"] for p in train["prompt"]}
    held_out_texts = {p[0]["content"] for p in held_out["prompt"]}
    assert len(held_out_texts) == 64 and len(train_texts) == len(world.all_instructions()) - 64
    assert not train_texts & held_out_texts
    assert world.ground_truth(held_out["prompt"][:1], ["the cat sees the box"]) in ([0.0], [1.0])
