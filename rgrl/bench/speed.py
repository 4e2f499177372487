"""`python -m rgrl.bench speed`: one denoising step taken apart, at tiny, toy and full-size shapes.

For each shape it builds a dLLM and a reward model — `tiny`: the tiny random checkpoints; `toy`: the toy world's;
`full`: the shipped Dream-v0-Instruct-7B and Skywork-Reward-V2-Qwen3-0.6B configs (V = 152,064, widths 3584 and
1024) with random weights and `--layers` blocks — and a canvas at the first denoising step (R rows of P prompt tokens
and L masked slots). It then times, interleaved over `--repeats` rounds (medians), each part of a guided step:

    dllm_layers           the dLLM's blocks over the canvas
    dllm_head             the LM head on the masked slots
    guidance_proposals    vocabulary work of one inner step: softmax, entropy weight, soft embedding, hard draw
    rm_forward_backward   one reward-model forward and backward into its input embeddings
    guidance_update       the soft path's gradient and the Adam step on φ
    sample_reveal         drawing tokens at the masked slots, ranking and revealing them
and the wholes: `guided_step` and `unguided_step` (the sampler's `denoise_step`), `guidance` (the M inner steps as
the sampler runs them), with `--compile` `guidance_compiled` (the same with `guidance.compile`: its vocabulary chains
fused by torch.compile) and, with `--oracle`, `naive_guidance` (tests/oracles.py: the paper's reference written
directly — autograd through a full-vocabulary softmax, a full sort for top-p, torch.optim.Adam).

Per part it reports the median time, the peak memory added while it runs (CPU: the process's peak resident set,
reset before each part; CUDA: the allocator's peak), its FLOPs (`rgrl.models.flops`) and the fraction of the FLOP
floor (FLOPs over the matmul throughput measured at start, divided by the time). For the guidance parts it also
counts memory traffic per masked position: the bytes every tensor operation reads and writes (for compiled kernels,
every generated kernel, as inductor counts them). What a part updates in place is copied before it is measured.
Last, the FLOP model of a paper-sized RGRL rollout. The report goes to `out` as REPORT.md, REPORT.csv and REPORT.json
(`report`, default `speed`). `python -m rgrl.bench speed --help` lists every option.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rgrl import cli
from rgrl.guidance import GuidanceConfig, GuidanceStats, RewardGuidance
from rgrl.guidance.estimators import FreshAdam, VocabularyKernels
from rgrl.models.flops import TransformerShape, soft_embedding_flops
from rgrl.sampling import DiffusionSampler, SamplerConfig
from rgrl.sampling.sampler import GenerationStats
from rgrl.sampling.schedules import RevealStep

Shape = Literal["tiny", "toy", "full"]
SHAPES = get_args(Shape)
# rows × prompt tokens × masked slots per shape (a paper RGRL rollout has 8 rows, ~300 prompt tokens, 128 slots)
DEFAULT_CANVAS = {"tiny": (8, 16, 32), "toy": (16, 24, 16), "full": (8, 64, 128)}
SETTINGS = {  # the guidance of the paper's RGRL rollouts and of its test-time runs
    "rgrl": dict(steps=1, lr=0.5, temperature=0.9, top_p=0.95, top_k=50),
    "test_time": dict(steps=3, lr=0.5, temperature=0.7, top_p=0.95, top_k=None),
}


PARTS = ("dllm_layers", "dllm_head", "guidance_proposals", "rm_forward_backward", "guidance_update", "sample_reveal",
         "guidance", "guided_step", "unguided_step", "guidance_compiled", "naive_guidance")


@dataclass
class SpeedOptions:
    """`python -m rgrl.bench speed` options."""

    shapes: list[Shape] = field(default_factory=lambda: list(SHAPES))  # the shapes measured, in this order
    setting: str = "rgrl"  # the guidance's M, τ, top-p, top-k: rgrl (the paper's RGRL rollouts) or test_time
    device: str = "cpu"  # cpu or cuda
    dtype: Literal["float32", "bfloat16"] | None = None  # model dtype (default: float32 on CPU, bfloat16 on CUDA)
    layers: int = 1  # blocks of the full-size models (random weights)
    rows: int | None = None  # canvas rows (default per shape)
    prompt_length: int | None = None  # prompt tokens per row (default per shape)
    slots: int | None = None  # masked completion slots per row (default per shape)
    repeats: int = 5  # interleaved rounds; times are medians
    oracle: bool = False  # also run the naive guidance (tests/oracles.py)
    compile: bool = False  # also run guidance with its vocabulary chains compiled (guidance.compile)
    parts: list[str] | None = None  # measure only these parts (default: all; the module docstring lists them)
    rollout: int = 0  # > 0: also time whole guided rollouts (T = L steps), exact against prompt_cache_refresh R
    out: str = "docs/results"  # where the report goes
    report: str = "speed"  # report file names: REPORT.md, REPORT.csv, REPORT.json

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {self.setting!r}.")
        if self.repeats < 1 or self.layers < 1 or self.rollout < 0:
            raise ValueError("repeats and layers must be >= 1 and rollout >= 0.")
        if any(value is not None and value < 1 for value in (self.rows, self.prompt_length, self.slots)):
            raise ValueError("rows, prompt_length and slots must be >= 1.")
        unknown = sorted(set(self.parts or []) - set(PARTS))
        if unknown:
            raise ValueError(f"parts: unknown {unknown}; the parts are {list(PARTS)}.")
        for part, flag in (("guidance_compiled", self.compile), ("naive_guidance", self.oracle)):
            if part in (self.parts or []) and not flag:
                raise ValueError(f"parts: {part} needs {'compile' if part == 'guidance_compiled' else 'oracle'}: true.")


def main(argv: list[str] | None = None) -> None:
    options = cli.parse_options("python -m rgrl.bench speed", __doc__, argv, SpeedOptions)
    dtype = getattr(torch, options.dtype or ("bfloat16" if options.device.startswith("cuda") else "float32"))
    command = cli.command_string("python -m rgrl.bench speed", argv)
    throughput = matmul_throughput(torch.device(options.device), dtype)
    results = []
    for name in options.shapes:
        rows, prompt_length, slots = DEFAULT_CANVAS[name]
        canvas = (options.rows or rows, options.prompt_length or prompt_length, options.slots or slots)
        setup = build(name, torch.device(options.device), dtype, options.layers, canvas, SETTINGS[options.setting])
        results.append(measure(setup, options.repeats, options.oracle, options.compile, throughput, options.parts))
        if options.rollout:
            results[-1]["rollout"] = rollouts(setup, options.rollout, options.repeats)
        print(format_shape(results[-1]), flush=True)
        del setup
        gc.collect()
    report = {"command": command, "machine": machine(options.device),
              "setting": {options.setting: SETTINGS[options.setting]},
              "dtype": str(dtype).removeprefix("torch."), "matmul_flops_per_second": throughput, "shapes": results,
              "paper_rollout": paper_rollout_flops()}
    write_report(report, Path(options.out), options.report)


# ----------------------------------------------------------------------------------------------------------------
# What is measured


@dataclass
class Setup:
    """One shape, ready to time: a sampler (with its guidance) and the first step's canvas."""

    name: str
    sampler: DiffusionSampler
    guidance: RewardGuidance
    canvas: torch.Tensor  # [R, P + L], every completion slot masked
    attention_mask: torch.Tensor  # [R, P + L]
    prompts: list[str]  # what the reward model reads as each row's prompt


class IdentityBridge:
    """Ê = the reward model's embedding rows 0..V-1 (zeros past its vocabulary): Dream and Qwen3 share the Qwen2
    tokenizer, so for timing at full size the real bridge is (nearly) this identity."""

    def __init__(self, num_rows: int):
        self.num_rows = num_rows

    @torch.no_grad()
    def embedding_matrix(self, embeddings: torch.nn.Module) -> torch.Tensor:
        weight = embeddings.weight.detach()
        table = weight.new_zeros((self.num_rows, weight.shape[1]))
        rows = min(self.num_rows, weight.shape[0])
        table[:rows] = weight[:rows]
        return table


def build(name: str, device: torch.device, dtype: torch.dtype, layers: int, canvas_shape: tuple[int, int, int],
          setting: dict) -> Setup:
    """The models of a shape (module docstring), a sampler with guidance, and a random first-step canvas."""
    from rgrl.models.loading import load_dllm, num_logit_rows
    from rgrl.rewards import RewardModel, VocabBridge

    rows, prompt_length, slots = canvas_shape
    dtype_name = str(dtype).removeprefix("torch.")
    if name in ("tiny", "toy"):
        dllm = load_dllm(f"{name}:dream", dtype=dtype_name, device=device)
        model, family, tokenizer = dllm.model, dllm.family, dllm.tokenizer
        reward_model = RewardModel.from_pretrained(f"{name}:rm", dtype=dtype_name, device=device)
        bridge = VocabBridge(tokenizer, reward_model.tokenizer, num_rows=num_logit_rows(model))
    else:
        model, family, tokenizer, reward_model = _full_size(device, dtype, layers)
        bridge = IdentityBridge(num_logit_rows(model))
    sampler_config = SamplerConfig(steps=slots, max_completion_length=slots, schedule="linear",
                                   temperature=setting["temperature"], top_p=setting["top_p"],
                                   top_k=setting["top_k"], deprioritize_eos=False)
    guidance = RewardGuidance(GuidanceConfig(method="entrgi", steps=setting["steps"], lr=setting["lr"],
                                             measure_gain=False), reward_model, bridge, family.stop_token_ids)
    sampler = DiffusionSampler(model.eval(), tokenizer, family, sampler_config, guidance)
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, family.mask_token_id, (rows, prompt_length), generator=generator)
    prompt_ids = prompt_ids.masked_fill(torch.isin(prompt_ids, torch.tensor(family.stop_token_ids)), 0)
    canvas = torch.cat([prompt_ids, torch.full((rows, slots), family.mask_token_id)], dim=1).to(device)
    prompts = [" ".join(["word"] * prompt_length)] * rows
    return Setup(name, sampler, guidance, canvas, torch.ones_like(canvas, dtype=torch.bool), prompts)


def _full_size(device: torch.device, dtype: torch.dtype, layers: int):
    """Dream-v0-Instruct-7B and Skywork-Reward-V2-Qwen3-0.6B shapes with random weights and `layers` blocks. The
    tokenizers are the tiny Qwen-style one (ids < 512 are valid in both vocabularies): only shapes matter here."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from rgrl.models.family import resolve_family
    from rgrl.models.loading import architecture_config
    from rgrl.toy.tiny import build_tokenizer
    from rgrl.rewards import RewardModel

    torch.manual_seed(0)
    config = architecture_config("dream-v0-instruct-7b", num_hidden_layers=layers)
    model = AutoModel.from_config(config, dtype=dtype).to(device)
    tokenizer = build_tokenizer("qwen")
    family = resolve_family(config, tokenizer, {"mask_token_id": config.mask_token_id,
                                                "eos_token_id": config.eos_token_id})
    family = dataclasses.replace(family, num_tokens=config.mask_token_id + 1)  # Dream's ids end at its mask token
    rm_config = architecture_config("skywork-reward-v2-qwen3-0.6b", num_hidden_layers=layers, num_labels=1)
    rm = AutoModelForSequenceClassification.from_config(rm_config, dtype=dtype).to(device)
    return model, family, tokenizer, RewardModel(rm, build_tokenizer("qwen"))


def measure(setup: Setup, repeats: int, oracle: bool, compiled: bool, throughput: float,
            only: list[str] | None = None) -> dict:
    """Time, peak memory, FLOPs and (for the guidance) memory traffic of every part of one guided step."""
    sampler, guidance = setup.sampler, setup.guidance
    config, family = sampler.config, sampler.family
    rows, width = setup.canvas.shape
    slots = setup.canvas[:, -config.max_completion_length:]
    masked = slots == family.mask_token_id

    def bound(seed: int, guide: RewardGuidance = guidance):
        return guide.bind(setup.prompts, config.max_completion_length, config.temperature, config.top_p, config.top_k,
                          torch.Generator(guidance.device).manual_seed(seed))

    hook = bound(1)
    with torch.no_grad():
        logits = sampler._masked_logits(setup.canvas, setup.attention_mask, masked)  # φ at the first step [N, V]
    num_masked, vocab = logits.shape
    step = RevealStep(block_start=0, block_end=config.max_completion_length, count=1)
    keep = torch.zeros_like(setup.canvas, dtype=torch.bool)
    keep[:, -config.max_completion_length:] = masked
    if family.shifted_logits:
        keep = keep.roll(-1, dims=1)
    base = sampler.model.get_base_model() if hasattr(sampler.model, "get_base_model") else sampler.model
    with torch.no_grad():
        hidden = base.model(input_ids=setup.canvas, attention_mask=setup.attention_mask).last_hidden_state
        embeds, _ = hook.proposals(logits)
    embeds.requires_grad_(True)
    with torch.enable_grad():
        (grad_embeds,) = torch.autograd.grad(-hook.rewards(logits, embeds, slots, masked).sum(), embeds)
    embeds = embeds.detach()

    def rm_pass():
        leaf = embeds.clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(-hook.rewards(logits, leaf, slots, masked).sum(), leaf)

    def step_with(guide):
        return Part(lambda: (setup.canvas.clone(),), lambda canvas: sampler.denoise_step(
            canvas, setup.attention_mask, step, guide, GenerationStats(rows=rows),
            torch.Generator(logits.device).manual_seed(2)))

    fresh_logits = lambda: (logits.clone(),)  # noqa: E731 -- each run updates its own φ, copied before it starts
    parts = {
        "dllm_layers": Part(None, lambda: base.model(input_ids=setup.canvas, attention_mask=setup.attention_mask)),
        "dllm_head": Part(None, lambda: base.get_output_embeddings()(hidden[keep])),
        "guidance_proposals": Part(None, lambda: hook.proposals(logits)),
        "rm_forward_backward": Part(None, rm_pass),
        "guidance_update": Part(fresh_logits, lambda phi: hook.update(
            FreshAdam(phi, lr=guidance.config.lr, steps=1), phi, grad_embeds)),
        "sample_reveal": Part(lambda: (slots.clone(),), lambda tokens: sampler._reveal(
            tokens, masked, logits, logits, step, torch.Generator(logits.device).manual_seed(3))),
        "guidance": Part(fresh_logits, lambda phi: hook(phi, slots, masked, GuidanceStats())),
        "guided_step": step_with(hook),
        "unguided_step": step_with(None),
    }
    agreement = {}
    if compiled:
        compiled_guidance = copy.copy(guidance)
        compiled_guidance.config = dataclasses.replace(guidance.config, compile=True)
        compiled_guidance.kernels = VocabularyKernels.compiled()
        compiled_hook = bound(1, compiled_guidance)
        parts["guidance_compiled"] = Part(fresh_logits, lambda phi: compiled_hook(phi, slots, masked, GuidanceStats()))
        agreement["compiled"] = _agreement(bound(5, compiled_guidance)(logits.clone(), slots, masked),
                                           bound(5)(logits.clone(), slots, masked))
    if oracle:
        naive = _naive_guidance(hook, logits, slots, masked)
        parts["naive_guidance"] = Part(None, naive)
        agreement["naive"] = _agreement(bound(5)(logits.clone(), slots, masked), naive(seed=5))
    assert set(parts) <= set(PARTS), "a new part goes into PARTS too"
    if only:
        parts = {name: part for name, part in parts.items() if name in only}
    times = {name: [] for name in parts}
    names = list(parts)
    for round_ in range(repeats + 1):  # round 0 warms up; each round starts at another part (no fixed neighbours)
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            inputs = parts[name].inputs()
            _synchronize(logits.device)
            start = time.perf_counter()
            with torch.no_grad():
                parts[name].run(*inputs)
            _synchronize(logits.device)
            if round_:
                times[name].append(time.perf_counter() - start)
            del inputs
    memory = {name: peak_memory_added(part, logits.device) for name, part in parts.items()}
    traffic = {name: memory_traffic(parts[name]) / num_masked for name in ("guidance", "naive_guidance") if name in parts}
    if "guidance_compiled" in parts:
        traffic["guidance_compiled"] = compiled_memory_traffic(parts["guidance_compiled"], compiled_guidance) / num_masked

    flops = step_flops(sampler.model, guidance, rows, width, num_masked, hook.scorer)
    flops["guided_step"] = flops["dllm_layers"] + flops["dllm_head"] + flops["guidance"]
    flops["guidance_compiled"] = flops["guidance"]
    flops["unguided_step"] = flops["dllm_layers"] + flops["dllm_head"]
    table = []
    for name in parts:
        seconds = statistics.median(times[name])
        row = {"part": name, "seconds": seconds, "peak_added_mib": memory[name] / 2**20,
               "flops": flops.get(name), "floor_fraction": None, "traffic_mb_per_position": None}
        if row["flops"]:
            row["floor_fraction"] = row["flops"] / throughput / seconds
        if name in traffic:
            row["traffic_mb_per_position"] = traffic[name] / 1e6
        table.append(row)
    seconds = {row["part"]: row["seconds"] for row in table}
    summary = {}
    if {"dllm_layers", "dllm_head", "rm_forward_backward", "guided_step"} <= set(seconds):
        passes = seconds["dllm_layers"] + seconds["dllm_head"] + guidance.config.steps * seconds["rm_forward_backward"]
        summary["guided_step_over_model_passes"] = seconds["guided_step"] / passes
    for variant in ("guidance", "guidance_compiled"):
        if variant in seconds and "naive_guidance" in seconds:
            summary[f"{variant}_time_over_naive"] = seconds[variant] / seconds["naive_guidance"]
            summary[f"{variant}_memory_over_naive"] = memory[variant] / max(memory["naive_guidance"], 1)
    return {"shape": setup.name, "rows": rows, "prompt_length": width - config.max_completion_length,
            "slots": config.max_completion_length, "masked": num_masked, "vocab": vocab,
            "embedding_dim": guidance.embedding_matrix.shape[1], "parts": table, "summary": summary,
            "agreement": agreement}


@dataclass
class Part:
    """A measured piece of work: `run(*inputs())`, with its inputs (fresh copies of what it updates in place) made
    before the measurement starts, so neither their time, memory nor traffic is counted."""

    make_inputs: object  # () -> tuple, or None for no inputs
    run: object

    def inputs(self) -> tuple:
        return self.make_inputs() if self.make_inputs else ()


def _agreement(phi: torch.Tensor, reference: torch.Tensor) -> dict:
    finite = torch.isfinite(reference)  # impossible tokens stay at -inf in both
    return {"max_abs_phi_difference": float((phi - reference)[finite].abs().max()),
            "same_argmax": bool(torch.equal(phi.argmax(-1), reference.argmax(-1)))}


def rollouts(setup: Setup, refresh: int, repeats: int) -> list[dict]:
    """Whole guided generations from the setup's prompts, exact and with the prompt cache refreshed every `refresh`
    steps, interleaved: median wall time, counted FLOPs (`DiffusionSampler.generation_flops`) and the speed-up."""
    base = setup.sampler
    length = base.config.max_completion_length
    prompt_ids = setup.canvas[:, :-length]
    variants = {"exact": 0, f"prompt cache r={refresh}": refresh}
    samplers = {name: DiffusionSampler(base.model, base.tokenizer, base.family,
                                       dataclasses.replace(base.config, prompt_cache_refresh=r), setup.guidance)
                for name, r in variants.items()}
    times, flops = {name: [] for name in variants}, {}
    for _ in range(repeats):
        for name, sampler in samplers.items():
            _synchronize(prompt_ids.device)
            start = time.perf_counter()
            out = sampler.denoise(prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), setup.prompts, seed=0)
            _synchronize(prompt_ids.device)
            times[name].append(time.perf_counter() - start)
            flops[name] = sum(sampler.generation_flops(out.stats).values())
    exact = statistics.median(times["exact"])
    return [{"variant": name, "steps": len(base.plan), "seconds": statistics.median(times[name]),
             "flops": flops[name], "speedup": exact / statistics.median(times[name]),
             "flop_ratio": flops["exact"] / flops[name]} for name in variants]


def _naive_guidance(hook, logits, slots, masked):
    """The paper's guidance written directly (tests/oracles.py), on the same reward model and proposals."""
    try:
        from tests import oracles
    except ImportError as error:
        raise SystemExit("--oracle needs the repository's tests/ package: run from the repository root.") from error
    config = hook.guidance.config

    def reward(embeds, phi):
        return hook.rewards(phi.detach(), embeds, slots, masked)

    def run(seed: int = 4):
        with torch.enable_grad():
            return oracles.guided_logits(logits, hook.guidance.embedding_matrix, reward, config.method, config.steps,
                                         config.lr, hook.temperature, hook.top_p, hook.top_k,
                                         torch.Generator(logits.device).manual_seed(seed))

    return run


def step_flops(model, guidance, rows: int, width: int, num_masked: int, scorer) -> dict[str, int]:
    """FLOPs of the parts of one guided step from the models' shapes (`rgrl.models.flops`); the reward model runs
    the scorer's columns after its cached prompt prefix."""
    dllm = TransformerShape.from_config(model.config)
    rm = TransformerShape.from_config(guidance.reward_model.model.config, head_rows=1)
    rm_rows, rm_width = scorer.input_shape
    run = rm_width - scorer.cached_columns
    vocab, dim = guidance.embedding_matrix.shape
    rm_pass = rm.forward_flops(rm_rows, run, keys=rm_width) + rm.input_backward_flops(rm_rows, run, keys=rm_width)
    proposals = soft_embedding_flops(num_masked, vocab, dim, backward=False)
    update = soft_embedding_flops(num_masked, vocab, dim, backward=True) - proposals
    steps = guidance.config.steps
    return {
        "dllm_layers": dllm.linear_flops(rows, width) + dllm.attention_flops(rows, width),
        "dllm_head": dllm.head_flops(num_masked),
        "guidance_proposals": proposals,
        "rm_forward_backward": rm_pass,
        "guidance_update": update,
        "guidance": steps * (proposals + rm_pass + update),
        "naive_guidance": steps * (proposals + rm_pass + update),
    }


def paper_rollout_flops(rows: int = 8, prompt_length: int = 300, slots: int = 128, steps: int = 128,
                        guidance_steps: int = 1, rm_template_tokens: int = 12) -> dict:
    """FLOPs of one paper-sized RGRL rollout (Dream-v0-Instruct-7B, Skywork-Reward-V2-Qwen3-0.6B, linear schedule),
    by component, and what reusing the prompt's keys/values would save."""
    from rgrl.models.loading import architecture_config

    dllm = TransformerShape.from_config(architecture_config("dream-v0-instruct-7b"))
    rm = TransformerShape.from_config(architecture_config("skywork-reward-v2-qwen3-0.6b"), head_rows=1)
    width, rm_width = prompt_length + slots, prompt_length + slots + rm_template_tokens
    masked = [rows * (slots - slots * t // steps) for t in range(steps)]  # linear schedule, first step all masked
    rm_pass = rm.forward_flops(rows, rm_width) + rm.input_backward_flops(rows, rm_width)
    components = {
        "dllm_layers": steps * (dllm.linear_flops(rows, width) + dllm.attention_flops(rows, width)),
        "dllm_head_masked_slots": sum(dllm.head_flops(n) for n in masked),
        "rm_forward_backward": steps * guidance_steps * rm_pass,
        "vocabulary_products": sum(guidance_steps * soft_embedding_flops(n, dllm.vocab_size, rm.hidden_size, True)
                                   for n in masked),
    }
    total = sum(components.values())
    dllm_prompt = steps * (dllm.linear_flops(rows, prompt_length) + dllm.attention_flops(rows, prompt_length))
    live = rm_width - prompt_length  # what every RM pass runs once the prompt prefix is cached
    rm_cached = (rm.forward_flops(rows, prompt_length) + steps * guidance_steps
                 * (rm.forward_flops(rows, live, keys=rm_width) + rm.input_backward_flops(rows, live, keys=rm_width)))
    return {
        "setting": dict(rows=rows, prompt_length=prompt_length, slots=slots, steps=steps, M=guidance_steps),
        "components": components,
        "total": total,
        "measure_gain_forward": steps * rm.forward_flops(rows, rm_width),
        "dllm_head_all_completion_rows": steps * dllm.head_flops(rows * (slots + 1)),
        "dllm_prompt_share": dllm_prompt / components["dllm_layers"],
        "rm_with_prefix_cache": rm_cached,
        "rm_prefix_share": 1 - rm_cached / components["rm_forward_backward"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Instruments


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_throughput(device: torch.device, dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of a square matmul in this dtype on this device, the best of a few runs (the FLOP floor's rate)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times[1:])


def _resident(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_added(part: Part, device: torch.device) -> int:
    """Bytes by which memory peaks above its level before the part runs (its inputs already made): the CUDA
    allocator's peak, or on the CPU the process's peak resident set (Linux: reset through /proc/self/clear_refs)."""
    inputs = part.inputs()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            part.run(*inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _resident("VmRSS")
    with torch.no_grad():
        part.run(*inputs)
    return max(_resident("VmHWM") - before, 0)


_GATHERS = ("index", "embedding", "gather", "index_select")


class _TrafficCounter(TorchDispatchMode):
    """Sums the bytes of every tensor each operation reads or writes (views and allocations move no data)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if func.is_view or "empty" in name:
            return out
        tensors = [value for value in tree_flatten((args, kwargs, out))[0] if isinstance(value, torch.Tensor)]
        if name.split(".")[0] in _GATHERS:  # reads only the gathered rows of its source: count the rest and twice the out
            tensors = tensors[1:] + [out]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def memory_traffic(part: Part | Callable) -> int:
    """Bytes read and written by the tensor operations of a part (or a callable), each operand counted once per
    operation; the part's inputs are made before counting starts."""
    part = part if isinstance(part, Part) else Part(None, part)
    inputs = part.inputs()
    with _TrafficCounter() as counter, torch.no_grad():
        part.run(*inputs)
    return counter.bytes


def compiled_memory_traffic(part: Part, guidance: RewardGuidance) -> int:
    """`memory_traffic` of a part that runs guidance's compiled vocabulary kernels: the eager operations around them
    as above, and for each compiled kernel call the bytes its generated kernels read and write, as inductor counts
    them for the graph it compiled (each buffer once per generated kernel; a fused kernel's repeated passes over a
    row that stays in cache count once). Compiles afresh, without inductor's caches, so every graph is counted;
    every call of a kernel must have the shapes it was compiled for (all chunks of φ equally long)."""
    import logging

    from torch._inductor import compile_fx, metrics
    from torch.utils._python_dispatch import _disable_current_modes

    metrics_log = logging.getLogger(compile_fx.inductor_metrics_log.name)
    saved_log = (metrics_log.level, metrics_log.propagate, metrics_log.handlers[:])
    metrics_log.setLevel(logging.INFO)  # inductor counts bytes only when this log is enabled
    metrics_log.propagate, metrics_log.handlers = False, [logging.NullHandler()]
    kernels, counted, per_call = guidance.kernels, [0], {}

    def counting(kernel):
        def run(*args):
            key = (kernel.__name__, *(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args))
            before = metrics.num_bytes_accessed
            with _disable_current_modes():  # the compiled kernel runs as compiled, unseen by the eager counter
                out = kernel(*args)
            if metrics.num_bytes_accessed != before:
                per_call[key] = metrics.num_bytes_accessed - before
            if key not in per_call:
                raise RuntimeError(f"{kernel.__name__} was called with shapes it was not counted for: make the "
                                   "masked rows a multiple of guidance.chunk_rows.")
            counted[0] += per_call[key]
            return out
        return run

    torch._dynamo.reset()
    guidance.kernels = VocabularyKernels(*(counting(getattr(kernels, f.name)) for f in dataclasses.fields(kernels)))
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            eager = memory_traffic(part)
    finally:
        guidance.kernels = kernels
        metrics_log.setLevel(saved_log[0])
        metrics_log.propagate, metrics_log.handlers = saved_log[1], saved_log[2]
    return eager + counted[0]


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()[0], "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def format_shape(result: dict) -> str:
    lines = [f"## {result['shape']}: {result['rows']} rows × ({result['prompt_length']} prompt + {result['slots']} "
             f"slots), {result['masked']} masked positions, V = {result['vocab']}, d_RM = {result['embedding_dim']}",
             "", "| part | median s | peak added MiB | GFLOP | of FLOP floor | traffic MB / position |",
             "|---|---|---|---|---|---|"]
    for row in result["parts"]:
        gflop = None if row["flops"] is None else row["flops"] / 1e9
        lines.append(f"| {row['part']} | {_fmt(row['seconds'])} | {_fmt(row['peak_added_mib'], 4)} | {_fmt(gflop)} | "
                     f"{_fmt(row['floor_fraction'], 2)} | {_fmt(row['traffic_mb_per_position'])} |")
    lines.append("")
    lines.extend(f"- {name.replace('_', ' ')}: {_fmt(value)}" for name, value in result["summary"].items())
    if result.get("rollout"):
        lines += ["", "Whole guided rollouts (medians):", "", "| variant | steps | seconds | GFLOP | speed-up | FLOP ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['steps']} | {_fmt(r['seconds'])} | {_fmt(r['flops'] / 1e9)} | "
                  f"{_fmt(r['speedup'])} | {_fmt(r['flop_ratio'])} |" for r in result["rollout"]]
    for name, against in (("naive", "exact path vs naive"), ("compiled", "compiled vs eager guidance")):
        if name in result["agreement"]:
            agreement = result["agreement"][name]
            lines.append(f"- {against} at the same seed: max |Δφ| {_fmt(agreement['max_abs_phi_difference'])}, "
                         f"same argmax: {agreement['same_argmax']}")
    return "\n".join(lines)


def write_report(report: dict, out: Path, name: str = "speed") -> None:
    out.mkdir(parents=True, exist_ok=True)
    rollout = report["paper_rollout"]
    total = rollout["total"]
    lines = [
        "# One denoising step, taken apart", "",
        f"`{report['command']}` — {report['machine']['processor']}, {report['machine']['cpus']} CPUs, "
        f"torch {report['machine']['torch']} ({report['machine']['torch_threads']} threads), device "
        f"{report['machine'].get('gpu', report['machine']['device'])}, {report['dtype']}, load average "
        f"{report['machine']['load_average_at_start']:.2f} at start; matmul throughput "
        f"{report['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s. Guidance: {report['setting']}.", "",
        "Medians of interleaved rounds. *Peak added*: memory above the level before the part ran. *Of FLOP floor*: "
        "the part's matrix-product FLOPs at the measured matmul rate, over its time. *Traffic*: bytes read and written "
        "by every tensor operation of the part, per masked position.", "",
    ]
    for result in report["shapes"]:
        lines += [format_shape(result), ""]
    lines += ["## FLOP model of a paper-sized RGRL rollout", "",
              f"Dream-v0-Instruct-7B + Skywork-Reward-V2-Qwen3-0.6B, {rollout['setting']}, linear schedule: "
              f"{total / 1e15:.2f} PFLOP.", "", "| component | PFLOP | share |", "|---|---|---|"]
    lines += [f"| {name} | {value / 1e15:.3f} | {value / total:.1%} |" for name, value in rollout["components"].items()]
    lines += ["", f"- `measure_gain` would add {rollout['measure_gain_forward'] / 1e15:.3f} PFLOP "
              f"({rollout['measure_gain_forward'] / total:.1%}).",
              f"- The LM head on every completion row instead of the masked ones: "
              f"{rollout['dllm_head_all_completion_rows'] / 1e15:.3f} PFLOP.",
              f"- The prompt's share of the dLLM blocks (what the cache mode's reuse of its keys/values can save): "
              f"{rollout['dllm_prompt_share']:.1%}.",
              f"- The reward model's passes with the prompt prefix run once per generation (rgrl's exact path): "
              f"{rollout['rm_with_prefix_cache'] / 1e15:.3f} PFLOP, {rollout['rm_prefix_share']:.1%} less.", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["shape", "part", "seconds", "peak_added_mib", "flops", "floor_fraction",
                         "traffic_mb_per_position"])
        for result in report["shapes"]:
            for row in result["parts"]:
                writer.writerow([result["shape"], row["part"], row["seconds"], row["peak_added_mib"], row["flops"],
                                 row["floor_fraction"], row["traffic_mb_per_position"]])
    print(f"report: {out / name}.md")
