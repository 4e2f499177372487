"""Faults and bad input, each injected on purpose (docs/reliability.md maps every fault to the test that shows it).

Fast: non-finite rewards (both trainers), non-finite losses skip the optimizer step, adapters with NaN are never
saved, checkpoint completeness (marker, truncation, `last`), input errors that name the file and the fix, range
checks, secrets kept out of pickled arguments, the reward model scoring the prompt the dLLM saw.

Slow (2 processes, DDP on CPU/gloo via launch/multi_gpu.yaml): SIGTERM mid-run -> checkpoint, clean exit, and the
resumed run equals an uninterrupted one; kill -9 of one process ends the job quickly and `last` resumes it to the
same result; a frozen process (SIGSTOP) ends the job within ddp_timeout with a message naming the waiting process;
an offline Hub dataset gets one message, not one per process.
"""

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from rgrl.data import PromptDataConfig, check_prompt_file, load_prompts
from rgrl.recipe import RecipeError, scrub_secret_arguments, without_secrets
from rgrl.sampling import DiffusionSampler, SamplerConfig
from rgrl.train import collective_failure, load_training_recipe
from rgrl.trainers import RGRLConfig
from rgrl.trainers.base import total_rewards
from rgrl.trainers.checkpoints import CheckpointError, check_checkpoint, latest_complete_checkpoint, write_marker
from tests.test_trainers import K, make_trainer, reward_model  # noqa: F401  (the module fixture)

REPO = Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


# ------------------------------------------------------------------------------------------------ non-finite rewards
def test_total_rewards_mark_non_finite_rows():
    per_func = torch.tensor([[1.0, 2.0], [NAN, 3.0], [NAN, NAN], [INF, 1.0], [1.0, -INF], [2.0, NAN]])
    total = total_rewards(per_func, torch.tensor([1.0, 0.5]))
    # NaN in one of two functions = that function did not score the row (TRL's None): the other one counts
    expected = torch.tensor([2.0, 1.5, NAN, NAN, NAN, 2.0])
    assert torch.equal(total.isnan(), expected.isnan())
    assert torch.equal(total[~total.isnan()], expected[~expected.isnan()])


# Beside the reward model: a NaN (TRL's None) means "this function does not score the row", so row 0's total is the
# reward model's; the ±inf rows have no finite total.
FLAKY = [NAN, 1.0, -INF, 4.0, INF, 2.0, 3.0, 5.0]


def flaky_reward(prompts, completions, **kwargs):
    return FLAKY[: len(completions)]


@pytest.mark.parametrize("kind", ["diffu_grpo", "rgrl"])
def test_non_finite_rewards_get_no_signal_and_are_counted(kind, tmp_path, reward_model):
    trainer = make_trainer(kind, tmp_path, reward_model, extra_rewards=[flaky_reward], num_generations=4,
                           per_device_train_batch_size=8)
    trainer.model.train()
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in ("A cat.", "A dog.") for _ in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    total = torch.tensor(trainer._logs["rewards"]["tiny_rm"]) + torch.tensor(FLAKY).nan_to_num(nan=0.0, posinf=INF, neginf=-INF)
    bad = ~total.isfinite()
    assert bad.tolist() == [False, False, True, False, True, False, False, False]
    signal = batch["advantages" if kind == "diffu_grpo" else "sample_weights"]
    assert torch.all(signal[bad] == 0) and signal.isfinite().all()
    if kind == "diffu_grpo":  # reward − mean of the group's finite rewards
        for group in (slice(0, 4), slice(4, 8)):
            finite = total[group][~bad[group]]
            assert torch.allclose(signal[group][~bad[group]], finite - finite.mean())
    else:
        assert torch.all(signal[~bad] == 1)
    metrics = trainer._metrics["train"]
    assert metrics["rewards/non_finite"] == [2.0]
    assert metrics["reward"][-1] == pytest.approx(total[~bad].mean().item(), rel=1e-6)
    assert metrics["rewards/flaky_reward/mean"][-1] == pytest.approx(sum([1.0, 4.0, 2.0, 3.0, 5.0]) / 5)
    assert all(math.isfinite(v) for values in metrics.values() for v in values)


def test_infinite_rewards_train_to_a_finite_adapter(tmp_path, reward_model):
    """The reported failure: ±inf rewards made diffu-GRPO's advantages ±3.4e38 and the LoRA weights NaN."""
    def infinite_reward(prompts, completions, **kwargs):
        return [INF if i % 4 == 0 else -INF if i % 4 == 1 else 0.5 * i for i in range(len(completions))]

    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, extra_rewards=[infinite_reward], max_steps=2,
                           save_strategy="steps", save_steps=2)
    trainer.train()
    adapter = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert all(value.isfinite().all() for value in adapter.values())
    train = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["rewards/non_finite"] for e in train] == [2.0, 2.0]  # 2 of every 4 rows (K=2: 1 of each group)
    assert all(isinstance(e["reward"], float) and math.isfinite(e["grad_norm"]) for e in train)
    assert [e["learner/skipped_steps"] for e in train] == [0, 0]


def test_non_finite_loss_skips_the_optimizer_step(tmp_path, reward_model):
    trainer = make_trainer("rgrl", tmp_path, reward_model, max_steps=2)
    compute_loss = trainer._compute_loss
    calls = []

    def nan_on_first_step(model, inputs):
        calls.append(1)
        loss = compute_loss(model, inputs)
        return loss * NAN if len(calls) == 1 else loss

    trainer._compute_loss = nan_on_first_step
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    states = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            states.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    trainer.add_callback(Snapshot())
    trainer.train()
    after_first, after_second = states
    assert all(torch.equal(after_first[n], lora[n]) for n in lora), "the NaN step moved the weights"
    assert any(not torch.equal(after_second[n], lora[n]) for n in lora), "the finite step did not"
    assert not trainer.optimizer.state_dict()["state"] or all(
        s["step"] == 1 for s in trainer.optimizer.state_dict()["state"].values()), "Adam counted the skipped step"
    train = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["learner/skipped_steps"] for e in train] == [1, 1]  # running count


def test_adapter_with_nan_is_never_saved(tmp_path, reward_model):
    trainer = make_trainer("rgrl", tmp_path, reward_model)
    name, parameter = next((n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        parameter[0, 0] = NAN
    with pytest.raises(FloatingPointError, match="NaN/inf values .*lora_B"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_sigusr1_checkpoints_at_the_next_step_boundary_and_stops(tmp_path, reward_model):
    """One process: SIGUSR1 arrives during step 1's callbacks (after the preemption check), so training stops at the
    end of step 2 with a complete checkpoint-2; the previous handler is back afterwards."""
    trainer = make_trainer("rgrl", tmp_path, reward_model, max_steps=4)

    class SignalDuringStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer.add_callback(SignalDuringStepOne())
    before = signal.getsignal(signal.SIGUSR1)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.preemption.received == "SIGUSR1"
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    check_checkpoint(tmp_path / "checkpoint-2")
    assert signal.getsignal(signal.SIGUSR1) == before


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, reward_model):
    out = tmp_path_factory.mktemp("checkpointed")
    make_trainer("rgrl", out, reward_model, max_steps=2, save_strategy="steps", save_steps=1).train()
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "out"))


def test_checkpoints_carry_a_completion_marker(checkpointed_run):
    for step in (1, 2):
        checkpoint = checkpointed_run / f"checkpoint-{step}"
        marker = json.loads((checkpoint / "rgrl_checkpoint.json").read_text())
        assert marker["step"] == step
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                "rng_state.pth"} <= set(marker["files"])
        check_checkpoint(checkpoint)
    assert latest_complete_checkpoint(checkpointed_run) == checkpointed_run / "checkpoint-2"


@pytest.mark.parametrize("damage", ["adapter_model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt",
                                    "trainer_state.json", "marker", "garbled_state"])
def test_corrupt_checkpoint_is_named_and_skipped(damage, checkpointed_run, tmp_path):
    out = copy_of(checkpointed_run, tmp_path)
    newest = out / "checkpoint-2"
    if damage == "marker":
        (newest / "rgrl_checkpoint.json").unlink()  # killed before the save finished
        expected = "is incomplete: it has no rgrl_checkpoint.json"
    elif damage == "garbled_state":
        state = newest / "trainer_state.json"
        state.write_text("x" * state.stat().st_size)  # same size, not JSON
        expected = "trainer_state.json: not valid JSON"
    else:
        path = newest / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = f"{damage}: {path.stat().st_size} bytes, but"
    with pytest.raises(CheckpointError, match="resume from an earlier checkpoint") as error:
        check_checkpoint(newest)
    assert expected in str(error.value) and str(newest) in str(error.value)
    assert latest_complete_checkpoint(out) == out / "checkpoint-1"


def test_truncated_safetensors_with_a_matching_marker_is_named(tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    write_marker(checkpoint, 1)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        check_checkpoint(checkpoint)


def test_resume_last_and_explicit_checkpoints_in_the_recipe(at_repo_root, tmp_path, checkpointed_run):
    out = copy_of(checkpointed_run, tmp_path)
    base = ["--training.output_dir", str(out)]
    resolved = load_training_recipe("recipes/tiny_dream.yaml", [*base, "--training.resume_from_checkpoint", "last"],
                                    dry_run=True).recipe.training.resume_from_checkpoint
    assert resolved == str(out / "checkpoint-2")
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")  # a save cut short
    resolved = load_training_recipe("recipes/tiny_dream.yaml", [*base, "--training.resume_from_checkpoint", "last"],
                                    dry_run=True).recipe.training.resume_from_checkpoint
    assert resolved == str(out / "checkpoint-1")
    with pytest.raises(RecipeError, match=r"'training.resume_from_checkpoint': .*checkpoint-2/optimizer.pt: 0 bytes"):
        load_training_recipe("recipes/tiny_dream.yaml",
                             [*base, "--training.resume_from_checkpoint", str(out / "checkpoint-2")], dry_run=True)
    empty = tmp_path / "fresh"
    resolved = load_training_recipe("recipes/tiny_dream.yaml", ["--training.output_dir", str(empty),
                                                                "--training.resume_from_checkpoint", "last"],
                                    dry_run=True).recipe.training.resume_from_checkpoint
    assert resolved is None  # nothing to resume: a fresh start


def test_non_empty_output_dir_needs_resume_or_overwrite(at_repo_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RecipeError, match="output_dir .* is not empty \\(metrics.jsonl\\).*resume_from_checkpoint: "
                                          "last.*overwrite_output_dir: true"):
        load_training_recipe("recipes/tiny_dream.yaml", ["--training.output_dir", str(out)], dry_run=True)
    load_training_recipe("recipes/tiny_dream.yaml", ["--training.output_dir", str(out),
                                                     "--training.overwrite_output_dir", "true"], dry_run=True)


# ------------------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"\n  \n", "the file is empty"),
    (b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n', "line 2, column 16: byte 0xe9 is not UTF-8 text"),
    (b'{"prompt": "fine"}\n\n{"prompt": "no end"\n', "line 3: not valid JSON"),
    (b'{"prompt": "fine"}\n["a list"]\n', "line 2: a JSON list, not an object"),
])
def test_bad_prompt_files_name_the_file_and_line(content, expected, tmp_path, at_repo_root):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as error:
        check_prompt_file(path)
    assert str(error.value).startswith(str(path))
    with pytest.raises(ValueError, match=expected):  # the loader, not only the check
        load_prompts(PromptDataConfig(source="local", path=str(path), field="prompt"))
    with pytest.raises(RecipeError, match=f"'data.path': {path}.*{expected}"):  # and --dry_run
        load_training_recipe("recipes/tiny_dream.yaml", ["--data.path", str(path), "--training.output_dir",
                                                         str(tmp_path / "out")], dry_run=True)


def test_unknown_model_type_says_how_to_set_the_family(tmp_path, at_repo_root):
    from rgrl.toy.tiny import tiny_checkpoint

    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((tiny_checkpoint("dream") / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "my_dllm"}))
    with pytest.raises(RecipeError) as error:
        load_training_recipe("recipes/tiny_dream.yaml", ["--model.path", str(model)], dry_run=True)
    message = str(error.value)
    assert f"{model}/config.json: model_type 'my_dllm'" in message and "model.family" in message
    assert "'Dream'" in message and "trust_remote_code=True" not in message


def test_truncated_model_weights_are_named(tmp_path, at_repo_root):
    from rgrl.toy.tiny import tiny_checkpoint

    model = Path(shutil.copytree(tiny_checkpoint("dream"), tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RecipeError, match=f"{weights}: not a readable safetensors file"):
        load_training_recipe("recipes/tiny_dream.yaml", ["--model.path", str(model)], dry_run=True)


def test_offline_hub_ids_get_one_clear_message(tmp_path, at_repo_root):
    args = ["--model.path", "some-org/not-cached", "--training.output_dir", str(tmp_path)]
    notes = load_training_recipe("recipes/tiny_dream.yaml", args, dry_run=True).notes
    assert any("'model.path': the Hub model 'some-org/not-cached' is not in the local" in note for note in notes)
    with pytest.raises(RecipeError, match="hf download some-org/not-cached.*local copy"):
        load_training_recipe("recipes/tiny_dream.yaml", args)
    with pytest.raises(ConnectionError, match="'some-org/prompts' cannot be reached.*`data.path` to a local copy"):
        load_prompts(PromptDataConfig(source="hub", path="some-org/prompts", field="prompt"))


RANGE_ERRORS = {
    "learning_rate": (["--training.learning_rate", "-1e-4"], "learning_rate must be > 0, got -0.0001"),
    "max_steps": (["--training.max_steps", "-5"], "max_steps must be >= 1 (or -1"),
    "lora.r": (["--lora.r", "0"], "LoRA needs r >= 1"),
    "top_p high": (["--training.top_p", "1.5"], "top_p must be in (0, 1]"),
    "top_p zero": (["--training.top_p", "0"], "top_p must be in (0, 1]"),
    "reward weight": (["--rewards", "[{model: 'tiny:rm', weight: .inf}]"], "a reward needs a finite weight"),
    "two problems at once": (["--training.learning_rate", "-1", "--training.save_steps", "0"],
                             "learning_rate must be > 0, got -1.0; save_steps must be > 0"),
}


@pytest.mark.parametrize("case", sorted(RANGE_ERRORS))
def test_dry_run_checks_ranges(case, at_repo_root, tmp_path):
    overrides, expected = RANGE_ERRORS[case]
    with pytest.raises(RecipeError) as error:
        load_training_recipe("recipes/tiny_dream.yaml", [*overrides, "--training.output_dir", str(tmp_path)],
                             dry_run=True)
    assert expected in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_hardware_mismatches_are_reported_together(at_repo_root, tmp_path):
    with pytest.raises(RecipeError) as error:
        load_training_recipe("recipes/tiny_dream.yaml", ["--training.bf16", "true", "--model.load_in_4bit", "true",
                                                         "--training.output_dir", str(tmp_path)])
    message = str(error.value)
    assert "training.bf16 is on (set in the recipe)" in message and "model.load_in_4bit is on" in message


@pytest.mark.parametrize("override, expected", [
    (["--seeds", "abc"], "'seeds[0]' must be an integer, got 'abc'"),
    (["--prompts.path", "recipes/data/none.jsonl"], "'prompts.path': no file or folder at"),
])
def test_steer_dry_run_rejects_bad_values(override, expected, at_repo_root):
    from rgrl.steer import main as steer

    with pytest.raises(SystemExit) as exit_info:  # sys.exit("error: ..."): a message, no traceback
        steer(["recipes/steer_tiny_dream.yaml", "--dry_run", *override])
    assert str(exit_info.value.code).startswith("error: recipes/steer_tiny_dream.yaml: ")
    assert expected in str(exit_info.value.code)


# ------------------------------------------------------------------------------------------------ secrets
SENTINEL = "hf_SENTINELtoken0123456789"


def test_tokens_stay_out_of_pickled_arguments_and_saved_recipes(tmp_path):
    import copy

    args = RGRLConfig(output_dir=str(tmp_path), bf16=False, hub_token=SENTINEL, report_to="none")
    assert SENTINEL.encode() not in pickle.dumps(args)
    torch.save(args, tmp_path / "training_args.bin")
    assert SENTINEL.encode() not in (tmp_path / "training_args.bin").read_bytes()
    assert copy.deepcopy(args).hub_token == SENTINEL, "an in-memory copy keeps it (push_to_hub needs it)"
    assert SENTINEL not in json.dumps(args.to_dict())
    raw = {"training": {"hub_token": SENTINEL, "lr": 1}, "tracker": {"api_key": SENTINEL}}
    assert SENTINEL not in yaml.safe_dump(without_secrets(raw))
    argv = ["rgrl.train", "r.yaml", "--training.hub_token", SENTINEL, f"--wandb.api_key={SENTINEL}", "--x", "1"]
    assert SENTINEL not in " ".join(scrub_secret_arguments(argv))
    assert scrub_secret_arguments(argv)[-2:] == ["--x", "1"]


# ------------------------------------------------------------------------------------------------ truncated prompts
def test_reward_model_scores_the_prompt_the_dllm_saw(tmp_path, reward_model):
    long_text = "Tell me everything about " + " and ".join(f"topic number {i}" for i in range(60)) + ". Be brief."
    seen = []

    def recording_reward(prompts, completions, **kwargs):
        seen.extend(prompts)
        return [0.0] * len(prompts)

    trainer = make_trainer("diffu_grpo", tmp_path, reward_model, extra_rewards=[recording_reward])
    trainer.sampler_config = SamplerConfig(**{**vars(trainer.sampler_config), "max_prompt_length": 40})
    trainer.model.train()
    rows = [{"prompt": [{"role": "user", "content": long_text}]}] * K
    with pytest.warns(UserWarning, match="longer than max_prompt_length=40"):
        batch = trainer._generate_and_score_completions(rows)
    assert int(batch["prompt_mask"].sum(dim=1).max()) <= 40
    content = seen[0][-1]["content"]
    assert len(content) < len(long_text) and long_text.endswith(content) and content.endswith("Be brief.")
    rendered = trainer.family.render_prompt(trainer.processing_class, seen[0])
    ids = trainer.processing_class(rendered, add_special_tokens=False)["input_ids"]
    assert batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist() == ids, "the dLLM saw exactly this"


def test_short_prompts_are_untouched_and_too_small_limits_fail():
    from rgrl.models.loading import load_dllm

    dllm = load_dllm("tiny:dream", dtype="float32")
    sampler = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, SamplerConfig(max_prompt_length=64))
    prompts = ["Hi there.", [{"role": "user", "content": "Hello."}]]
    assert sampler.fit_prompts(prompts) == prompts
    tight = DiffusionSampler(dllm.model, dllm.tokenizer, dllm.family, SamplerConfig(max_prompt_length=3))
    with pytest.raises(ValueError, match="max_prompt_length=3 is shorter than the chat template"):
        tight.fit_prompts(["Hi there."])


# ------------------------------------------------------------------------------------------------ collectives
def test_collective_failures_are_explained(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 30000ms for send operation "
                           "to complete")
    text = collective_failure(timeout, 30, step=3)
    assert text.startswith("process 0 of 2 waited more than training.ddp_timeout=30 s during training step 3")
    assert "(a send operation)" in text
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:18858. This is")
    assert "lost its connection to another process at 127.0.0.1:18858:" in collective_failure(closed, 30)
    assert collective_failure(RuntimeError("CUDA out of memory"), 30) is None


# ------------------------------------------------------------------------------------------------ 2 processes (slow)
# tiny_dream.yaml on 2 processes (4 rows each = 2 prompts × K per step), 3 optimizer steps, no evaluation.
RUN_SETTINGS = ["--training.max_steps", "3", "--training.per_device_train_batch_size", "4",
                "--training.eval_strategy", "no", "--data.num_eval_prompts", "0", "--training.save_strategy", "no",
                "--training.report_to", "none"]


def two_process_training(out: Path, *overrides: str) -> list[str]:
    from tests.test_distributed import accelerate_launch, free_port

    return [*accelerate_launch("multi_gpu.yaml", 2, free_port()), "-m", "rgrl.train", "recipes/tiny_dream.yaml",
            "--training.output_dir", str(out), *RUN_SETTINGS, *overrides]


def two_process_env(**extra) -> dict:
    from tests.test_distributed import launch_env

    return {**launch_env(True), **extra}


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A launch in its own process group (as a scheduler sees a job step), its output in `log`."""
    with log.open("w") as handle:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)


def logged_steps(out: Path) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "rgrl.train" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no training process of rank {rank}")


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path) -> None:
    ours, theirs = final_adapter(run), final_adapter(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours), "the resumed run differs"


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    from rgrl.toy.tiny import tiny_checkpoint

    for name in ("dream", "rm"):
        tiny_checkpoint(name)  # built once here, not concurrently by the launched processes
    out = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(two_process_training(out), cwd=REPO, env=two_process_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert logged_steps(out) == [1, 2, 3]
    return out


def resume_last(out: Path) -> None:
    result = subprocess.run(two_process_training(out, "--training.resume_from_checkpoint", "last"), cwd=REPO,
                            env=two_process_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert logged_steps(out)[-1] == 3


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_to_the_same_adapter(uninterrupted_run, tmp_path):
    """SIGTERM to every process of the job (what SLURM does on preemption) after step 1: both processes finish
    their step, save checkpoint-N (complete) and exit 0; no final adapter is written; `last` resumes from it and
    ends with the adapter of the uninterrupted run, bit for bit."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    # the launcher's grace for its processes to save after a signal: torchrun's 30 s default, raised for loaded CI
    launcher = start(two_process_training(out), two_process_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="180"), log)
    try:
        wait_for(lambda: logged_steps(out), launcher, log)
        os.killpg(launcher.pid, signal.SIGTERM)
        returncode = launcher.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    text = log.read_text()
    (checkpoint,) = out.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    check_checkpoint(checkpoint)
    assert text.count("SIGTERM received: saving a checkpoint at the end of the current step") == 2, text[-3000:]
    assert f"stopped after step {step} with checkpoint-{step} saved" in text
    assert "exitcode  : 1" not in text and "ChildFailedError" not in text, "a training process failed"
    assert returncode == 128 + signal.SIGTERM  # the launcher reports the signal it received
    assert not (out / "adapter_model.safetensors").exists(), "a preempted run writes no final adapter"
    resume_last(out)
    assert_same_adapter(out, uninterrupted_run)


@pytest.mark.slow
def test_kill_9_of_one_process_ends_the_job_and_last_resumes_it(uninterrupted_run, tmp_path):
    """kill -9 of process 1 once checkpoint-1 is complete: the job ends within seconds (the launcher stops the
    other process); `last` skips any checkpoint the kill cut short and the resumed run equals the uninterrupted
    one."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    launcher = start(two_process_training(out, "--training.save_strategy", "steps", "--training.save_steps", "1"),
                     two_process_env(), log)
    try:
        wait_for(lambda: (out / "checkpoint-1" / "rgrl_checkpoint.json").exists(), launcher, log)
        killed = time.monotonic()
        os.kill(worker_pid(launcher, 1), signal.SIGKILL)
        returncode = launcher.wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    # the bound leaves room for a loaded machine and for torchrun's 30 s grace before it kills a process
    assert returncode != 0 and elapsed < 60, (returncode, elapsed, log.read_text()[-3000:])
    if not logged_steps(out) or logged_steps(out)[-1] < 3:
        resume_last(out)
    assert_same_adapter(out, uninterrupted_run)


@pytest.mark.slow
def test_frozen_process_ends_the_job_within_ddp_timeout(tmp_path):
    """SIGSTOP on process 1 (alive, not dead): process 0 gives up after training.ddp_timeout = 10 s with a message
    naming itself and what it waited for; the launcher then ends the job, killing the frozen process after its
    fixed 30 s grace for a failed job (torchrun's)."""
    from rgrl.toy.tiny import tiny_checkpoint

    tiny_checkpoint("dream"), tiny_checkpoint("rm")
    out, log = tmp_path / "out", tmp_path / "run.log"
    launcher = start(two_process_training(out, "--training.max_steps", "50", "--training.ddp_timeout", "10"),
                     two_process_env(), log)
    frozen = None
    try:
        wait_for(lambda: logged_steps(out), launcher, log)
        frozen = worker_pid(launcher, 1)
        stopped = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        returncode = launcher.wait(timeout=120)  # without a timeout on the gloo group this waits forever
        elapsed = time.monotonic() - stopped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
    text = log.read_text()
    assert returncode != 0 and elapsed < 10 + 30 + 30, (elapsed, text[-3000:])
    assert "error: process 0 of 2 waited more than training.ddp_timeout=10 s during training step" in text, text[-3000:]
    assert "another process is stuck (frozen" in text


@pytest.mark.slow
def test_offline_hub_dataset_is_reported_once_for_two_processes(tmp_path):
    from tests.test_distributed import accelerate_launch, free_port

    command = [*accelerate_launch("multi_gpu.yaml", 2, free_port()), "-m", "rgrl.train", "recipes/tiny_dream.yaml",
               "--training.output_dir", str(tmp_path / "out"), "--data.source", "hub", "--data.path",
               "some-org/prompts", "--data.field", "prompt", "--data.num_eval_prompts", "0",
               "--training.eval_strategy", "no"]
    result = subprocess.run(command, cwd=REPO, env=two_process_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("error: The Hub dataset 'some-org/prompts' cannot be reached") == 1, output[-3000:]
    assert "`data.path` to a local copy" in output
    assert "rgrl/data/prompts.py" not in output and "datasets/load.py" not in output, "no traceback of rgrl's"
