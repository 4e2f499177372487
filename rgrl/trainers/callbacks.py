"""Training outputs people look at: metrics as JSON lines and training curves as a PNG, in `output_dir`.

`metrics.jsonl` mirrors the Trainer's log history (one object per log call, with its `step`); it is rewritten
from that history, so a resumed run continues the file of its checkpoint instead of duplicating steps.
`training_curves.png` plots the main metrics (train and eval side by side) on every save, evaluation and at
the end of training, with one panel per reward function (`rewards/<name>/mean`: e.g. a ground-truth checker
logged with weight 0) after the combined reward. Only the main process writes; both files are replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
# Panels of the curves plot: each shows the metric and its `eval_` counterpart, when logged.
PLOTTED_METRICS = (
    "reward",
    "reward_std",
    "loss",
    "learner/loglik",
    "guidance/reward_gain",
    "guidance/entropy_weight",
    "completions/mean_length",
    "kl",
    "clip_ratio/region_mean",
    "guidance/rollout_seconds",
)


def _replace_atomically(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_metrics(log_history: list[dict], path: str) -> None:
    lines = "".join(json.dumps(entry, default=str) + "\n" for entry in log_history)
    _replace_atomically(path, lambda handle: handle.write(lines.encode()))


def plotted_metrics(log_history: list[dict]) -> list[str]:
    """PLOTTED_METRICS with every reward function's `rewards/<name>/mean` right after `reward`."""
    reward_functions = sorted({key.removeprefix("eval_") for entry in log_history for key in entry
                               if key.removeprefix("eval_").startswith("rewards/") and key.endswith("/mean")})
    return [PLOTTED_METRICS[0], *reward_functions, *PLOTTED_METRICS[1:]]


def plot_curves(log_history: list[dict], path: str, title: str = "") -> bool:
    """Plot `plotted_metrics` against the step; returns False when nothing is plottable yet."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    def series(name):
        points = [(e["step"], e[name]) for e in log_history if isinstance(e.get(name), (int, float))]
        return [p for p in points if math.isfinite(p[1])]

    panels = [name for name in plotted_metrics(log_history) if series(name) or series(f"eval_{name}")]
    if not panels:
        return False
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    for index, name in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, key, style in (("train", name, "-"), ("eval (unguided)", f"eval_{name}", "o--")):
            points = series(key)
            if points:
                axes.plot(*zip(*points), style, label=label, markersize=4)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if series(f"eval_{name}"):
            axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    _replace_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    return True


class MetricsFileCallback(TrainerCallback):
    """Writes `metrics.jsonl` on every log and `training_curves.png` on save, evaluation and train end."""

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_metrics(state.log_history, os.path.join(args.output_dir, METRICS_FILE))

    def _plot(self, args, state):
        if state.is_world_process_zero:
            plot_curves(state.log_history, os.path.join(args.output_dir, CURVES_FILE), title=args.run_name or "")

    def on_save(self, args, state, control, **kwargs):
        self._plot(args, state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._plot(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._plot(args, state)
