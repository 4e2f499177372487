"""Trainer callbacks that keep a run's state sound when something goes wrong mid-run.

  NonFiniteStepGuard   a non-finite loss or gradient on any process skips the optimizer step (all processes agree),
                       counted as `learner/skipped_steps`; DeepSpeed's engine makes the same decision itself (its
                       overflow check, on for bf16 and fp16) and its skipped steps are counted too.
  PreemptionCallback   SIGTERM or SIGUSR1 (a scheduler preempting the job, or the time limit coming near) asks for a
                       checkpoint at the end of the current optimizer step, then training stops. The processes agree
                       at every step boundary, so a signal that reached only some of them still stops all of them at
                       the same step.

Both reduce one number over the processes per optimizer step (a sum, so every process takes the same decision).
"""

from __future__ import annotations

import logging
import signal

import torch
from accelerate.utils import reduce
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when `flag` is True on at least one (a sum over processes)."""
    return reduce(torch.tensor(float(flag), device=device), reduction="sum").item() > 0


class NonFiniteStepGuard(TrainerCallback):
    """Skips the optimizer step when the loss of a micro-batch or a gradient is NaN/±inf on any process.

    The trainer sets `trainer.non_finite_loss` from `training_step`; the gradients are the synchronised ones (DDP has
    averaged them before `on_pre_optimizer_step`). Skipping = dropping the gradients (`set_to_none`): torch optimizers
    leave parameters without a gradient untouched (no moment update, no weight decay). The learning-rate schedule
    still advances, so a resumed or repeated run keeps the same schedule per step.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.skipped = 0  # skipped optimizer steps not yet reported in a log

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled:  # the engine stepped inside backward and ran its own overflow check
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(g.isfinite().all()) for g in grads)
        bad = any_process(trainer.non_finite_loss or not finite, trainer.accelerator.device)
        trainer.non_finite_loss = False
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self._count(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled and trainer.accelerator.optimizer_step_was_skipped:
            self._count(state)
        trainer.non_finite_loss = False

    def _count(self, state) -> None:
        self.skipped += 1
        if self.trainer.accelerator.is_main_process:
            logger.warning(f"Optimizer step {state.global_step + 1} skipped: the loss or a gradient is NaN/inf on "
                           "at least one process; the weights are unchanged.")

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped


class PreemptionCallback(TrainerCallback):
    """On SIGTERM or SIGUSR1: checkpoint at the next optimizer-step boundary, then stop training.

    The handlers are installed for the duration of `train()` (the previous ones are restored after it), so a signal
    during the final save or evaluation acts as before. `received` holds the signal's name once one arrived.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.pending: str | None = None  # a signal this process received, not yet acted on
        self.received: str | None = None  # the signal that stopped training (on every process)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.pending is None:
            self.pending = signal.Signals(signum).name
            logger.warning(f"{self.pending} received: saving a checkpoint at the end of the current step, then "
                           "stopping.")

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.pending is not None, self.trainer.accelerator.device):
            self.received = self.pending or "a signal on another process"
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
