"""Distributed training and deployment, tested on CPU with gloo (no GPU, loopback only).

Fast: every launch/ config is a valid accelerate configuration (read by accelerate's own launcher code, DeepSpeed
configs through accelerate's DeepSpeed plugin), the DeepSpeed JSONs, the SLURM script's rendezvous and resume logic
(run against stub `scontrol`/`srun`/`accelerate`), the Dockerfile, and that reward models stay frozen, unpartitioned
and out of the optimiser.

Slow (multi-process runs of `tests/distributed_worker.py`, which runs `rgrl.train` and records what each process saw):
  - the learner: 2 processes == 1 process on the same global batch (RGRL and diffu-GRPO; rollouts replayed per
    prompt group so both runs learn from the same completions): loss and the LoRA update of SGD steps;
  - rollouts on 2 processes (DDP via launch/multi_gpu.yaml): whole groups of K per process, per-process seeds,
    logged rewards are means over both processes' rows;
  - DeepSpeed ZeRO-2 with 2 processes (data sharded): matches DDP, checkpoints, and a resumed run matches;
  - two "nodes" on 127.0.0.1 (launch/multinode_zero2.yaml, machine ranks 0 and 1): reproduces the ZeRO-2 run;
  - ZeRO-3: the policy is partitioned and gathered for rollouts (same completions as DDP), the reward model is
    replicated and frozen;
  - batch arithmetic that would split a group across processes fails with a clear message before loading weights.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import requires
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
WORKER = REPO / "tests" / "distributed_worker.py"
CONFIGS = {  # accelerate config -> (distributed type, DeepSpeed ZeRO stage or None, machines)
    "single_gpu.yaml": ("NO", None, 1),
    "multi_gpu.yaml": ("MULTI_GPU", None, 1),
    "zero2.yaml": ("DEEPSPEED", 2, 1),
    "zero3.yaml": ("DEEPSPEED", 3, 1),
    "multinode_zero2.yaml": ("DEEPSPEED", 2, 2),
    "multinode_zero3.yaml": ("DEEPSPEED", 3, 2),
}
K = 4  # num_generations of the tiny recipes
RUN_TIMEOUT = 600  # seconds for one launch; collectives inside time out after 180 s (distributed_worker.py)


# ------------------------------------------------------------------------------------------------ launch/ configs
def test_launch_folder_has_every_config():
    assert set(CONFIGS) == {p.name for p in LAUNCH.glob("*.yaml")}
    assert {p.name for p in LAUNCH.glob("*.json")} == {"ds_zero2.json", "ds_zero3.json"}
    assert (LAUNCH / "slurm_train.sh").is_file() and (LAUNCH / "README.md").is_file()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_is_valid(name, monkeypatch):
    """accelerate's launcher reads the file and derives its launch environment; DeepSpeed configs then build
    accelerate's DeepSpeedPlugin exactly as a launched process does (which rejects precision, accumulation or
    ZeRO keys set beside a `deepspeed_config_file`)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(REPO)  # configs name their DeepSpeed JSON relative to the repository root
    distributed_type, stage, machines = CONFIGS[name]
    config = load_config_from_file(f"launch/{name}")
    assert isinstance(config, ClusterConfig) and config.distributed_type.value == distributed_type
    assert config.num_machines == machines and config.mixed_precision is None  # precision is the recipe's

    rendezvous = ["--machine_rank", "1", "--main_process_ip", "10.0.0.1"] if machines > 1 else []
    args = launch_command_parser().parse_args(
        ["--config_file", f"launch/{name}", *rendezvous, "-m", "rgrl.train", "recipes/tiny_dream.yaml"])
    args, defaults, precision_from_config = _validate_launch_command(args)
    assert args.num_machines == machines and not precision_from_config
    if stage is None:
        if distributed_type == "MULTI_GPU":
            assert args.multi_gpu and prepare_multi_gpu_env(args)["ACCELERATE_MIXED_PRECISION"] == "no"
        return
    assert args.use_deepspeed and config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)
    assert plugin.hf_ds_config.config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json(stage):
    config = json.loads((LAUNCH / f"ds_zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # filled from the recipe's training arguments by transformers' DeepSpeed integration
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                "train_micro_batch_size_per_gpu"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config, "the recipe's optimizer and schedule are used"
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# ------------------------------------------------------------------------------------------------ SLURM
STUBS = {  # stand-ins for SLURM and the launcher: srun runs its command once per node with SLURM_NODEID set and
    # forwards SIGUSR1 to the running one, as srun forwards signals to its tasks; the launcher records a SIGUSR1
    "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "gpu-node-07\\ngpu-node-08\\n"\n'
                '[ "$1" = requeue ] && echo "requeue $2" >> "$STUB_LOG.events"\nexit 0\n',
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
            'trap \'kill -USR1 $task; signalled=1\' USR1\n'
            'for node in $(seq 0 $((SLURM_NNODES - 1))); do\n'
            '  SLURM_NODEID=$node "$@" & task=$!\n'
            '  while ! wait $task; do kill -0 $task 2>/dev/null || exit 1; done\n'
            '  if [ -n "$signalled" ]; then exit 0; fi  # real srun runs the nodes at once: none starts after it\n'
            'done\n',
    "accelerate": 'trap \'echo "launcher got USR1" >> "$STUB_LOG.events"; exit 0\' USR1\n'
                  'printf "%s\\n" "$@" "--end--" >> "$STUB_LOG"\nsleep "${STUB_SLEEP:-0}" & wait\n',
}


def slurm_env(tmp_path: Path, output_dir: Path, **extra) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "launches.txt"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rgrl", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO),
            "OUTPUT_DIR": str(output_dir), **extra}


def launches(tmp_path: Path) -> list[list[str]]:
    """The argument lists the stub `accelerate` was called with."""
    calls = (tmp_path / "launches.txt").read_text().split("--end--\n")[:-1]
    return [call.splitlines() for call in calls]


def run_slurm_script(tmp_path, output_dir, *recipe_args):
    result = subprocess.run(["bash", str(LAUNCH / "slurm_train.sh"), *recipe_args], env=slurm_env(tmp_path, output_dir),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return launches(tmp_path), result.stdout


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_slurm_script_parses():
    text = (LAUNCH / "slurm_train.sh").read_text()
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm_train.sh")], check=True)
    for needle in ("#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@",
                   "scontrol show hostnames", "SLURM_NODEID", "scontrol requeue", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                   "NCCL_DEBUG", "HF_HUB_DISABLE_TELEMETRY=1", "--training.ddp_timeout",
                   "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        assert needle in text, needle


def test_slurm_script_rendezvous_one_launcher_per_node(tmp_path):
    calls, stdout = run_slurm_script(tmp_path, tmp_path / "out", "recipes/wildchat_dream.yaml", "--training.seed", "7")
    assert len(calls) == 2, "one accelerate launch per node"
    for rank, call in enumerate(calls):
        assert call[:3] == ["launch", "--config_file", "launch/multinode_zero2.yaml"]
        assert option(call, "--machine_rank") == str(rank)
        assert option(call, "--num_machines") == "2" and option(call, "--num_processes") == "16"
        assert option(call, "--main_process_ip") == "gpu-node-07"  # the first node of the allocation
        assert option(call, "--main_process_port") == str(29500 + 4242 % 1000)
        train = call[call.index("-m"):]
        assert train[:5] == ["-m", "rgrl.train", "recipes/wildchat_dream.yaml", "--training.seed", "7"]
        assert option(train, "--training.output_dir") == str(tmp_path / "out")
        assert option(train, "--training.ddp_timeout") == "3600"
        assert option(train, "--training.resume_from_checkpoint") == "last"  # nothing to resume: a fresh start
    assert "resume from nothing" in stdout


def test_slurm_script_resumes_from_newest_complete_checkpoint(tmp_path):
    """checkpoint-15 was cut short mid-save: its trainer state and a truncated adapter are there, the completion
    marker (written after every other file) is not; the picker takes checkpoint-10."""
    out = tmp_path / "out"
    for step, complete in ((5, True), (10, True), (15, False)):
        checkpoint = out / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        (checkpoint / "adapter_model.safetensors").write_bytes(b"\x08" if not complete else b"\x08" * 64)
        if complete:
            (checkpoint / "rgrl_checkpoint.json").write_text("{}")
    calls, stdout = run_slurm_script(tmp_path, out, "recipes/wildchat_dream.yaml")
    assert [option(call, "--training.resume_from_checkpoint") for call in calls] == [str(out / "checkpoint-10")] * 2
    assert f"resume from {out / 'checkpoint-10'}" in stdout


def test_slurm_script_without_a_complete_checkpoint_resumes_last(tmp_path):
    """No complete checkpoint (the first start died before saving): `last` lets rgrl.train start fresh in the
    non-empty output folder instead of refusing it."""
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)  # no marker
    calls, stdout = run_slurm_script(tmp_path, out, "recipes/wildchat_dream.yaml")
    assert [option(call, "--training.resume_from_checkpoint") for call in calls] == ["last"] * 2
    assert "resume from nothing" in stdout



def test_slurm_script_requeues_itself_before_the_time_limit(tmp_path):
    """SLURM signals the batch shell (USR1, --signal=B:USR1@600) while the launchers run; the script forwards the
    signal to the launcher (which has the training processes checkpoint), waits for it to exit, then requeues."""
    log = tmp_path / "job.out"  # a file, not a pipe: the sleeping stub launcher keeps its stdout open
    with log.open("w") as output:
        script = subprocess.Popen(["bash", str(LAUNCH / "slurm_train.sh"), "recipes/wildchat_dream.yaml"],
                                  env=slurm_env(tmp_path, tmp_path / "out", STUB_SLEEP="60"), stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "launches.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first node's launcher is running (and sleeping)
        time.sleep(0.5)  # the stub launcher has set its trap
        script.send_signal(signal.SIGUSR1)
        script.wait(timeout=30)  # well before the 60 s the launcher would otherwise sleep
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)
    assert (tmp_path / "launches.txt.events").read_text() == "launcher got USR1\nrequeue 4242\n"
    assert script.returncode == 0 and "requeueing job 4242" in log.read_text()


# ------------------------------------------------------------------------------------------------ Docker
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_dockerfile():
    from packaging.requirements import Requirement

    instructions = dockerfile_instructions()
    args = dict(value.split("=", 1) for key, value in instructions if key == "ARG" and "=" in value)
    base = next(value for key, value in instructions if key == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and base.endswith("-devel")

    (pinned_install,) = [value for key, value in instructions if key == "RUN" and "==" in value]
    pins = {Requirement(token).name.lower(): Requirement(token) for token in pinned_install.split()[2:]}
    declared = [Requirement(r) for r in requires("rgrl") if "extra ==" not in r]  # pyproject's dependencies
    for requirement in declared:
        if requirement.name == "torch":
            continue  # the base image's
        (pin,) = pins[requirement.name.lower()].specifier
        assert pin.operator == "==" and requirement.specifier.contains(pin.version), (pin, requirement)
    assert "deepspeed" in pins and "bitsandbytes" in pins

    env = " ".join(value for key, value in instructions if key == "ENV")
    assert "HF_HUB_DISABLE_TELEMETRY=1" in env and "HF_HOME=/hf-cache" in env
    volumes = " ".join(value for key, value in instructions if key == "VOLUME")
    assert "/hf-cache" in volumes
    users = [value for key, value in instructions if key == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(key == "RUN" and "useradd" in value and users[-1] in value for key, value in instructions)
    installs = [value for key, value in instructions if key == "RUN" and "pip install" in value]
    assert any("--no-deps ." in value for value in installs), "rgrl itself is installed"
    entrypoint = json.loads(next(value for key, value in instructions if key == "ENTRYPOINT"))
    assert "accelerate launch" in " ".join(entrypoint) and "-m rgrl.train" in " ".join(entrypoint)


def test_dockerignore_keeps_context_small():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs", "wandb", "**/__pycache__"} <= ignored


# ------------------------------------------------------------------------------------------------ reward models
def test_replicated_loading_hides_the_zero3_config_on_both_routes():
    """`training.deepspeed` sets `args.hf_deepspeed_config`; `accelerate launch` with a DeepSpeed config leaves it
    None and holds the config in accelerate's DeepSpeed plugin. Either way reward models load unpartitioned."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    from rgrl.trainers.inputs import replicated_loading

    zero3 = json.loads((LAUNCH / "ds_zero3.json").read_text())
    trainer_route = SimpleNamespace(hf_deepspeed_config=HfDeepSpeedConfig(zero3), deepspeed_plugin=None)
    plugin = DeepSpeedPlugin(hf_ds_config=str(LAUNCH / "ds_zero3.json"), zero3_init_flag=True)
    launcher_route = SimpleNamespace(hf_deepspeed_config=None, deepspeed_plugin=plugin)
    try:
        for args in (trainer_route, launcher_route):
            if args.hf_deepspeed_config is not None:
                set_hf_deepspeed_config(args.hf_deepspeed_config)
            else:
                plugin.set_deepspeed_weakref()  # what TrainingArguments does under a DeepSpeed `accelerate launch`
            assert is_deepspeed_zero3_enabled()
            with replicated_loading(args):
                assert not is_deepspeed_zero3_enabled()
            assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()


def test_reward_model_is_frozen_and_outside_the_optimizer(tmp_path):
    """One process, no DeepSpeed: the guidance/scoring reward model of an RGRL trainer requires no grad and none of
    its parameters is in the optimizer's param groups (the slow runs check the same under DDP, ZeRO-2 and ZeRO-3)."""
    import datasets
    from peft import LoraConfig

    from rgrl.models.loading import load_dllm
    from rgrl.rewards import RewardModel, RewardModelFunction
    from rgrl.trainers import RGRLConfig, RGRLTrainer

    dllm = load_dllm("tiny:dream", dtype="float32")
    reward_model = RewardModel.from_pretrained("tiny:rm", dtype="float32")
    args = RGRLConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, report_to="none",
                      per_device_train_batch_size=4, num_generations=2, max_steps=1, dataloader_pin_memory=False,
                      diffusion_steps=2, max_completion_length=4)
    prompts = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hello there."}]] * 2})
    trainer = RGRLTrainer(
        dllm.model, [RewardModelFunction(reward_model, "rm")], args, train_dataset=prompts,
        processing_class=dllm.tokenizer, peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert trainer.guidance.reward_model is reward_model, "guided by the reward model among reward_funcs"
    optimizer = trainer.create_optimizer()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    reward_params = list(reward_model.model.parameters())
    assert optimized and all(id(p) not in optimized for p in reward_params)
    assert not any(p.requires_grad for p in reward_params)
    assert {id(p) for p in trainer.model.parameters()}.isdisjoint(map(id, reward_params))
    trained = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert optimized == trained, "the optimizer holds exactly the LoRA weights"


# ------------------------------------------------------------------------------------------------ multi-process
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(ddp_on_cpu: bool) -> dict:
    """One thread per process, offline, gloo on the loopback interface. `ACCELERATE_USE_CPU=1` makes a MULTI_GPU
    launch a real gloo group on a CPU machine (`accelerate launch --cpu` would start one process only); DeepSpeed
    launches must not set it (accelerate then drops DeepSpeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if ddp_on_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def accelerate_launch(config: str, processes: int, port: int, machines: int = 1, rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{config}",
            "--num_processes", str(processes), "--num_machines", str(machines), "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]


def worker(out: Path, recipe: str, overrides: list[str], replay: bool = False) -> list[str]:
    return [str(WORKER), "--report", str(out / "report"), *(["--replay"] if replay else []), f"recipes/{recipe}",
            "--training.output_dir", str(out), "--training.report_to", "none", *overrides]


def run_checked(command: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def read_run(out: Path) -> SimpleNamespace:
    """metrics.jsonl, the per-rank reports and the final adapter of a finished run."""
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reports = [json.loads(path.read_text()) for path in sorted((out / "report").glob("rank*.json"))]
    return SimpleNamespace(
        out=out, train=[e for e in entries if "loss" in e], eval=[e for e in entries if "eval_reward" in e],
        reports=reports, adapter=load_file(out / "adapter_model.safetensors"),
        rollouts=[[r for r in report["rollouts"] if r["mode"] == "train"] for report in reports],
        eval_rollouts=[[r for r in report["rollouts"] if r["mode"] == "eval"] for report in reports])


@pytest.fixture(scope="module", autouse=True)
def tiny_checkpoints():
    """Build the tiny checkpoints once here, not concurrently in the launched processes."""
    from rgrl.toy.tiny import tiny_checkpoint

    for name in ("dream", "rm"):
        tiny_checkpoint(name)


# The learner: 2 processes vs 1 on the same global batch. Dropout off, prompts unmasked (p_mask_prompt 0: the
# likelihood estimate has no per-process randomness), plain SGD without clipping (the update is lr × gradient,
# so a wrong gradient average across processes shows up as a wrong update).
LEARNER_SETTINGS = ["--lora.dropout", "0", "--training.p_mask_prompt", "0", "--training.optim", "sgd",
                    "--training.max_grad_norm", "0", "--training.eval_strategy", "no", "--data.num_eval_prompts", "0",
                    "--training.save_strategy", "no"]
LEARNER_CASES = {
    # recipe, steps, learning rate, per-device batch with 1 and with 2 processes (same global batch: 2 prompts × K)
    "rgrl": ("tiny_dream.yaml", 1, "0.5", 8, 4),
    # 2 steps = both inner iterations (μ = 2) of one rollout: old log-probs, ratio clipping and KL all act
    "diffu_grpo": ("tiny_dream_diffu_grpo.yaml", 2, "50", 4, 2),
}


def lora_update(run: SimpleNamespace) -> dict[str, torch.Tensor]:
    initial = load_file(run.out / "report" / "initial_adapter.safetensors")  # names carry PEFT's ".default"
    return {name: run.adapter[name.replace(".default", "")] - value for name, value in initial.items()}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", sorted(LEARNER_CASES))
def test_two_process_learner_matches_one_process(trainer, tmp_path):
    recipe, steps, lr, one_batch, two_batch = LEARNER_CASES[trainer]
    settings = [*LEARNER_SETTINGS, "--training.max_steps", str(steps), "--training.learning_rate", lr]
    one_out, two_out = tmp_path / "one", tmp_path / "two"
    run_checked([sys.executable, *worker(one_out, recipe, [*settings, "--training.per_device_train_batch_size",
                                                           str(one_batch)], replay=True)], launch_env(False))
    run_checked([*accelerate_launch("multi_gpu.yaml", 2, free_port()),
                 *worker(two_out, recipe, [*settings, "--training.per_device_train_batch_size", str(two_batch)],
                         replay=True)], launch_env(True))
    one, two = read_run(one_out), read_run(two_out)
    assert [r["world"]["num_processes"] for r in two.reports] == [2, 2]
    assert [r["world"]["torch_world_size"] for r in two.reports] == [2, 2]

    # the same global batch: the processes' rows, in rank order, are the 1-process rows
    (single,), (first, second) = one.rollouts, two.rollouts
    for key in ("prompts", "completion_ids"):
        assert single[0][key] == first[0][key] + second[0][key], key
    assert len(set(first[0]["prompts"]) | set(second[0]["prompts"])) == 2

    assert len(one.train) == len(two.train) == steps
    for a, b in zip(one.train, two.train):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["learner/loglik"] == pytest.approx(a["learner/loglik"], rel=1e-5)
    update_one, update_two = lora_update(one), lora_update(two)
    scale = max(u.abs().max().item() for u in update_one.values())
    assert scale > 1e-4, "the optimizer steps moved the adapter"
    worst = max((update_one[name] - update_two[name]).abs().max().item() for name in update_one)
    assert worst <= 1e-5 * scale, f"LoRA updates differ by {worst:.3g} (largest update {scale:.3g})"


# Rollouts of the tiny RGRL recipe on 2 processes, real (unreplayed) sampling, with an unguided evaluation at step 2.
# Activation checkpointing on, as in the GPU recipes (LoRA + checkpointing under DDP and ZeRO).
ROLLOUT_SETTINGS = ["--training.max_steps", "2", "--training.per_device_train_batch_size", "4",
                    "--training.eval_steps", "2", "--training.activation_checkpointing", "true"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_checked([*accelerate_launch("multi_gpu.yaml", 2, free_port()),
                 *worker(out, "tiny_dream.yaml", [*ROLLOUT_SETTINGS, "--training.save_strategy", "no"])],
                launch_env(True))
    return read_run(out)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    run_checked([*accelerate_launch("zero2.yaml", 2, free_port()),
                 *worker(out, "tiny_dream.yaml", [*ROLLOUT_SETTINGS, "--training.save_steps", "1"])],
                launch_env(False))
    return read_run(out)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """Two launcher invocations, machine ranks 0 and 1, one process each, rendezvous on 127.0.0.1 (the output dir
    is shared, as on a cluster's shared storage)."""
    out = tmp_path_factory.mktemp("two_nodes")
    port, env = free_port(), launch_env(False)
    command = worker(out, "tiny_dream.yaml", [*ROLLOUT_SETTINGS, "--training.save_steps", "1"])
    nodes = [subprocess.Popen([*accelerate_launch("multinode_zero2.yaml", 2, port, machines=2, rank=rank), *command],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        logs = [node.communicate(timeout=max(1, deadline - time.monotonic()))[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-6000:]
    return read_run(out)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """ZeRO-3 (TRL's PEFT + ZeRO-3 + checkpointing path): one step, then the final unguided evaluation."""
    out = tmp_path_factory.mktemp("zero3")
    run_checked([*accelerate_launch("zero3.yaml", 2, free_port()),
                 *worker(out, "tiny_dream.yaml", [*ROLLOUT_SETTINGS, "--training.max_steps", "1",
                                                  "--training.save_strategy", "no"])],
                launch_env(False))
    return read_run(out)


@pytest.mark.slow
def test_each_process_samples_whole_groups_with_its_own_seed(ddp_run):
    assert [r["world"]["num_processes"] for r in ddp_run.reports] == [2, 2]
    assert [r["world"]["distributed_type"] for r in ddp_run.reports] == ["DistributedType.MULTI_CPU"] * 2
    first_rounds = [rollouts[0] for rollouts in ddp_run.rollouts]
    assert [r["seed"] for r in first_rounds] == [42, 43], "set_seed(seed, device_specific=True): seed + rank"
    for rounds in (*ddp_run.rollouts, *ddp_run.eval_rollouts):
        for record in rounds:
            prompts = record["prompts"]
            assert len(prompts) % K == 0
            groups = [prompts[i : i + K] for i in range(0, len(prompts), K)]
            assert all(len(set(group)) == 1 for group in groups), "K consecutive copies of one prompt"
    for rank0, rank1 in zip(*ddp_run.rollouts):
        assert set(rank0["prompts"]).isdisjoint(rank1["prompts"]), "the processes share the prompts out"
    assert len(ddp_run.eval_rollouts[0]) == 1 and len(ddp_run.eval_rollouts[0][0]["prompts"]) == 2 * K


@pytest.mark.slow
def test_logged_metrics_are_means_over_all_processes(ddp_run):
    rank0, rank1 = ddp_run.rollouts
    assert len(rank0) == len(rank1) == len(ddp_run.train) == 2
    for entry, a, b in zip(ddp_run.train, rank0, rank1):
        rewards = a["local_rewards"] + b["local_rewards"]  # what each process's reward function returned
        assert entry["reward"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)
        lengths = [len(c) for c in a["completion_ids"] + b["completion_ids"]]
        assert entry["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert entry["completions/max_length"] == max(lengths)
    (eval_a,), (eval_b,) = ddp_run.eval_rollouts
    rewards = eval_a["local_rewards"] + eval_b["local_rewards"]
    assert ddp_run.eval[-1]["eval_reward"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)


def assert_same_training(run, reference, exact: bool):
    """Same rollouts at the first step (same seeds, same initial policy) and the same logged training."""
    for ours, theirs in zip(run.rollouts, reference.rollouts):
        assert ours[0]["prompts"] == theirs[0]["prompts"]
        assert ours[0]["completion_ids"] == theirs[0]["completion_ids"]
    steps = min(len(run.train), len(reference.train))
    for ours, theirs in zip(run.train[:steps], reference.train[:steps]):
        for key in ("loss", "reward", "learner/loglik", "grad_norm"):
            if exact:
                assert ours[key] == theirs[key], key
            else:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key


@pytest.mark.slow
def test_zero2_shards_data_over_two_processes_and_matches_ddp(zero2_run, ddp_run):
    world = [r["world"] for r in zero2_run.reports]
    assert [w["process_index"] for w in world] == [0, 1]
    assert all(w["num_processes"] == 2 and w["torch_world_size"] == 2 and w["zero_stage"] == 2 for w in world)
    assert_same_training(zero2_run, ddp_run, exact=False)
    shards = sorted(p.name for p in (zero2_run.out / "checkpoint-1" / "global_step1").glob("*optim_states.pt"))
    assert len(shards) == 2, f"ZeRO-2 partitions the optimizer state over both processes: {shards}"
    for name, value in ddp_run.adapter.items():
        assert torch.allclose(zero2_run.adapter[name], value, atol=1e-6), name


@pytest.mark.slow
def test_zero2_checkpoint_resumes(zero2_run, tmp_path):
    out = tmp_path / "resumed"
    run_checked([*accelerate_launch("zero2.yaml", 2, free_port()),
                 *worker(out, "tiny_dream.yaml", [*ROLLOUT_SETTINGS, "--training.save_strategy", "no",
                                                  "--training.resume_from_checkpoint",
                                                  str(zero2_run.out / "checkpoint-1")])],
                launch_env(False))
    resumed = read_run(out)
    assert [e["step"] for e in resumed.train] == [1, 2]  # step 1 comes from the checkpoint's log history
    assert resumed.train[-1]["loss"] == zero2_run.train[-1]["loss"]
    assert resumed.train[-1]["reward"] == zero2_run.train[-1]["reward"]
    for name, value in zero2_run.adapter.items():
        assert torch.equal(resumed.adapter[name], value), name


@pytest.mark.slow
def test_two_nodes_on_loopback_reproduce_the_single_node_run(two_node_run, zero2_run):
    assert [r["world"]["num_processes"] for r in two_node_run.reports] == [2, 2]
    assert_same_training(two_node_run, zero2_run, exact=True)  # a rerun with the same seeds is bit-identical
    for name, value in zero2_run.adapter.items():
        assert torch.equal(two_node_run.adapter[name], value), name
    assert (two_node_run.out / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.slow
def test_zero3_gathers_the_policy_for_rollouts(zero3_run, ddp_run):
    policy = [r["policy"] for r in zero3_run.reports]
    assert all(p["zero3_partitioned"] == p["parameters"] > 0 for p in policy), policy
    assert [r["world"]["zero_stage"] for r in zero3_run.reports] == [3, 3]
    assert_same_training(zero3_run, ddp_run, exact=False)  # rollouts saw the whole (gathered) policy


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_run", "zero2_run", "zero3_run"])
def test_reward_models_replicated_frozen_and_outside_the_optimizer(run, request):
    reports = request.getfixturevalue(run).reports
    numels = set()
    for report in reports:
        (reward_model,) = report["reward_models"]  # guidance and scoring share one replicated copy
        assert not reward_model["trainable"] and not reward_model["partitioned"]
        assert not reward_model["in_policy"] and not reward_model["in_optimizer"]
        assert reward_model["checksum_after"] == reward_model["checksum_before"], "training changed the RM"
        numels.add(reward_model["local_numel"])
    assert len(numels) == 1 and numels.pop() > 0, "every process holds the whole reward model"


@pytest.mark.slow
def test_batch_that_splits_groups_across_processes_fails_clearly(tmp_path):
    """2 processes × 2 rows = 4 = K passes TRL's global check, but each process would hold half a group."""
    result = subprocess.run(
        [*accelerate_launch("multi_gpu.yaml", 2, free_port()), "-m", "rgrl.train", "recipes/tiny_dream.yaml",
         "--training.per_device_train_batch_size", "2", "--training.output_dir", str(tmp_path)],
        cwd=REPO, env=launch_env(True), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode != 0
    assert "The 4 samples of a prompt must sit on one process" in result.stderr
    assert "per_device_train_batch_size × steps_per_generation = 2 × 1 = 2" in result.stderr
    assert "Loading weights" not in result.stderr + result.stdout, "the error comes before any weights load"
