"""How many masked positions each denoising step reveals (docs/design.md §2).

    dream   Dream's native schedule: timesteps linspace(1, eps, T+1); step i with t = ts[i], s = ts[i+1]
            reveals floor(n_masked · (1 − s/t)) and the last step reveals the rest (T = L = 128: 0, 1, …, 1, 2).
    linear  n // T per step, the remainder spread over the first steps (LLaDA's rule; L/T when it divides).

With `block_length` (LLaDA's semi-autoregressive decoding) the completion is split into blocks decoded left to
right, the steps are split evenly over the blocks, and each block follows the schedule on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

Schedule = Literal["dream", "linear"]
SCHEDULES = get_args(Schedule)


def reveal_counts(schedule: str, num_masked: int, steps: int, eps: float = 1e-3) -> list[int]:
    """Positions revealed at each of `steps` steps when `num_masked` positions start masked; sums to num_masked."""
    if schedule == "linear":
        base, remainder = divmod(num_masked, steps)
        return [base + 1] * remainder + [base] * (steps - remainder)
    if schedule == "dream":
        # float32 tensors, as in Dream's sampler, so the floors agree with it exactly
        timesteps = torch.linspace(1, eps, steps + 1)
        counts, remaining = [], num_masked
        for i in range(steps):
            if i == steps - 1:
                count = remaining
            else:
                count = int(torch.tensor(float(remaining)) * (1 - timesteps[i + 1] / timesteps[i]))
            counts.append(count)
            remaining -= count
        return counts
    raise ValueError(f"Unknown schedule {schedule!r}; expected one of {SCHEDULES}.")


@dataclass(frozen=True)
class RevealStep:
    """One denoising step: reveal `count` positions inside completion slots [block_start, block_end)."""

    block_start: int
    block_end: int
    count: int


def reveal_plan(schedule: str, max_completion_length: int, steps: int, block_length: int | None = None,
                eps: float = 1e-3) -> list[RevealStep]:
    """The whole generation's steps, block by block."""
    block_length = block_length or max_completion_length
    if max_completion_length % block_length:
        raise ValueError(f"block_length {block_length} must divide the completion length {max_completion_length}.")
    num_blocks = max_completion_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be divisible by the number of blocks ({num_blocks}).")
    plan = []
    for block in range(num_blocks):
        start = block * block_length
        for count in reveal_counts(schedule, block_length, steps // num_blocks, eps):
            plan.append(RevealStep(start, start + block_length, count))
    return plan
