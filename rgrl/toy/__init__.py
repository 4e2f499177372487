"""rgrl's own offline checkpoints: the toy world (a task with a ground truth, two small trained dLLMs and two reward
models, small enough to check reward guidance and RGRL on a CPU in minutes) and the tiny random checkpoints the
tests and CPU smoke recipes run on.

    rgrl.toy.world   the task, grammar, corpus, preference pairs and the ground-truth checker
                     (`rgrl.toy.world:ground_truth` is a TRL-style reward function)
    rgrl.toy.build   training the toy world's checkpoints; `python -m rgrl.toy build` regenerates rgrl/toy/checkpoints/
    rgrl.toy.tiny    the tiny random checkpoints; `python -m rgrl.toy tiny OUT_DIR` writes them

Importing this package (which `import rgrl` does) registers two checkpoint schemes with the loader
(`rgrl.models.loading.register_checkpoint_scheme`), so they work anywhere a model path is accepted:

    toy:<name>    a shipped toy-world checkpoint: toy:dream, toy:llada, toy:rm, toy:rm_llada
    tiny:<name>   a tiny random checkpoint, built into the cache ($RGRL_CACHE) on first use: tiny:dream,
                  tiny:llada, tiny:rm, tiny:rm_mismatched

The toy world's prompts are the `toy` prompt source.
"""

from pathlib import Path

from rgrl.models.loading import register_checkpoint_scheme
from rgrl.toy.tiny import tiny_checkpoint
from rgrl.toy.world import Check, Instruction, check, ground_truth, parse_instruction

SHIPPED_CHECKPOINTS = Path(__file__).parent / "checkpoints"


def toy_checkpoint(name: str) -> Path:
    """Directory of the shipped toy-world checkpoint `name` (the `toy:` scheme)."""
    path = SHIPPED_CHECKPOINTS / name
    if not (path / "config.json").is_file():
        shipped = sorted(found.parent.name for found in SHIPPED_CHECKPOINTS.glob("*/config.json"))
        raise FileNotFoundError(f"Toy checkpoint 'toy:{name}' not found at {path} (shipped: {shipped}). Build the "
                                "toy world with `python -m rgrl.toy build`.")
    return path


register_checkpoint_scheme("toy", toy_checkpoint)
register_checkpoint_scheme("tiny", tiny_checkpoint)

__all__ = ["SHIPPED_CHECKPOINTS", "Check", "Instruction", "check", "ground_truth", "parse_instruction",
           "tiny_checkpoint", "toy_checkpoint"]
