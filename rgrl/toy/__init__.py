"""The toy world: a task with a ground truth, two small trained dLLMs and two reward models, small enough to
check reward guidance and RGRL on a CPU in minutes.

    rgrl.toy.world   the task, grammar, corpus, preference pairs and the ground-truth checker
                     (`rgrl.toy.world:ground_truth` is a TRL-style reward function)
    rgrl.toy.build   training the checkpoints; `python -m rgrl.toy build` regenerates rgrl/toy/checkpoints/

The shipped checkpoints load anywhere a model path is accepted as `toy:dream`, `toy:llada`, `toy:rm` and
`toy:rm_llada`; the prompts are the `toy` prompt source.
"""

from rgrl.toy.world import Check, Instruction, check, ground_truth, parse_instruction

__all__ = ["Check", "Instruction", "check", "ground_truth", "parse_instruction"]
