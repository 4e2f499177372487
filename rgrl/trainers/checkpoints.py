"""Checkpoints that are complete or recognisably not: a completion marker, its check, and the newest complete one.

The Trainer writes `checkpoint-N/` file by file (adapter, optimizer, scheduler, RNG states, trainer state; under
DeepSpeed every process writes its own shards). A job killed in the middle leaves some of them missing or truncated.
`CheckpointMarker` waits for every process after a save and then writes `checkpoint-N/rgrl_checkpoint.json` (the
name and size of every file in the folder) to a temporary name and renames it: a checkpoint is complete exactly when
the marker exists and every file it lists has its recorded size. `check_checkpoint` verifies that (and that the
adapter's safetensors header and the trainer state parse), naming the file and what is wrong;
`latest_complete_checkpoint` is what `resume_from_checkpoint: last` and launch/slurm_train.sh resume from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from rgrl.models.loading import safetensors_problem

logger = logging.getLogger(__name__)

MARKER = "rgrl_checkpoint.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete or corrupt; the message names the file, what is wrong, and what to do."""


class CheckpointMarker(TrainerCallback):
    """After every checkpoint save: wait for all processes, then (main process) write the completion marker."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer.accelerator.wait_for_everyone()  # every process's shards are on disk
        if state.is_world_process_zero:
            write_marker(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
        self.trainer.accelerator.wait_for_everyone()


def write_marker(checkpoint: Path, step: int) -> None:
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".tmp-")}
    tmp = checkpoint / f".tmp-{MARKER}"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, checkpoint / MARKER)


def check_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Raise `CheckpointError` unless `checkpoint` is a complete checkpoint folder whose files are intact."""
    checkpoint = Path(checkpoint)
    later = "resume from an earlier checkpoint, or set `resume_from_checkpoint: last` to take the newest complete one"
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no checkpoint folder there.")
    marker = checkpoint / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{checkpoint} is incomplete: it has no {MARKER}, which rgrl writes after every other file of a "
            f"checkpoint, so its save was cut short (or it was not written by rgrl.train); {later}.")
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{marker}: not a valid completion marker ({error}); {later}.") from None
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint was written with it); {later}.")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, but {size} when it was written (truncated or "
                                  f"overwritten); {later}.")
    for path in checkpoint.glob("*.safetensors"):
        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"{path}: {problem}; {later}.")
    state = checkpoint / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text())
        except ValueError as error:
            raise CheckpointError(f"{state}: not valid JSON ({error}); {later}.") from None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-N` with the largest N in `output_dir` (None if there is none); incomplete or corrupt
    ones are skipped with a warning that says why."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in output_dir.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))), reverse=True)
    for _, path in steps:
        try:
            check_checkpoint(path)
        except CheckpointError as error:
            logger.warning(f"Skipping {path.name}: {str(error).split(';')[0]}.")
            continue
        return path
    return None
