"""`python -m rgrl.toy build [--out DIR] [--quick] [--seed S] [--difficulty D] [--entropy E] [--robust-rm]
[--only NAME…] [--threads N] [--no-guided-eval]`: build the toy world's checkpoints (see rgrl.toy.build);
`python -m rgrl.toy tiny OUT_DIR [--only NAME…]`: write the tiny random checkpoints (see rgrl.toy.tiny)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from rgrl.toy import world
from rgrl.toy.build import (CHECKPOINTS, DEFAULT_OUT, DIFFICULTY, ENTROPY, GUIDED_EVALS,
                            ROBUST_RM_DEGENERATE_FRACTION, BuildConfig, build)
from rgrl.toy.tiny import TINY_CHECKPOINTS, build_tiny_checkpoint


def summary(report: dict) -> str:
    """The measured numbers of a build report, one line per checkpoint."""
    lines = []
    for name, entry in report["checkpoints"].items():
        if "heldout_pair_accuracy" in entry:
            lines.append(f"{name:9s} {entry['parameters']:>8,d} params  held-out pair accuracy "
                         f"{entry['heldout_pair_accuracy']:.3f}, against ill-formed variants "
                         f"{entry['degenerate_pair_accuracy']:.3f}")
            continue
        line = f"{name:9s} {entry['parameters']:>8,d} params  sampled pass rate {entry['base']['pass_rate']:.3f}"
        if entry["base"]["reward"] is not None:
            line += f" (RM {entry['base']['reward']:+.2f})"
        for method in GUIDED_EVALS:
            if f"{method}_m1" in entry:
                guided = entry[f"{method}_m1"]
                line += f"  {method} M=1: {guided['pass_rate']:.3f} (RM {guided['reward']:+.2f})"
                if guided.get("entropy_weight") is not None and method == "entrgi":
                    line += f" mean w {guided['entropy_weight']:.3f}"
        lines.append(line)
    lines.append(f"built in {report['seconds']:.0f} s")
    return "\n".join(lines)


def build_config(args: argparse.Namespace) -> BuildConfig:
    """The BuildConfig of `build`'s command-line options."""
    config = BuildConfig.quick() if args.quick else BuildConfig()
    return replace(config, seed=args.seed, checkpoints=tuple(args.only), threads=args.threads,
                   guided_eval=config.guided_eval and not args.no_guided_eval,
                   world=world.WorldConfig(uses_word=DIFFICULTY[args.difficulty], synonyms=ENTROPY[args.entropy]),
                   rm=replace(config.rm, degenerate_fraction=ROBUST_RM_DEGENERATE_FRACTION if args.robust_rm else 0.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rgrl.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="train the toy dLLMs and reward models")
    build_parser.add_argument("--out", default=str(DEFAULT_OUT),
                              help=f"output directory (default: the shipped checkpoints, {DEFAULT_OUT})")
    build_parser.add_argument("--quick", action="store_true",
                              help="a reduced world in seconds, for smoke tests (its numbers mean nothing)")
    build_parser.add_argument("--seed", type=int, default=0,
                              help="seed of the world's corpus, pairs and model initialisation (0: the shipped world)")
    build_parser.add_argument("--difficulty", choices=DIFFICULTY, default="easy",
                              help="how rarely the corpus uses the pool word: "
                                   + ", ".join(f"{k} {v}" for k, v in DIFFICULTY.items()) + " (easy: shipped)")
    build_parser.add_argument("--entropy", choices=ENTROPY, default="low",
                              help="interchangeable words per slot: " + ", ".join(f"{k} {v}" for k, v in ENTROPY.items())
                                   + " (low: shipped)")
    build_parser.add_argument("--robust-rm", action="store_true",
                              help=f"train the reward models with ill-formed hard negatives (a fraction "
                                   f"{ROBUST_RM_DEGENERATE_FRACTION} of the pairs; shipped: none)")
    build_parser.add_argument("--only", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS),
                              help="checkpoints to build (default: all); a dLLM's guided evaluation needs its reward model")
    build_parser.add_argument("--threads", type=int, default=2,
                              help="CPU threads (default 2, as the shipped world was built; the result depends on it)")
    build_parser.add_argument("--no-guided-eval", action="store_true",
                              help="skip measuring guided pass rates in the report (faster)")
    tiny_parser = commands.add_parser("tiny", help="write the tiny random checkpoints (what tiny:<name> builds)")
    tiny_parser.add_argument("out_dir", help="directory that receives one sub-directory per checkpoint")
    tiny_parser.add_argument("--only", choices=TINY_CHECKPOINTS, nargs="*", default=list(TINY_CHECKPOINTS))
    args = parser.parse_args(argv)
    if args.command == "tiny":
        for name in args.only:
            print(f"{name}: {build_tiny_checkpoint(name, Path(args.out_dir) / name)}")
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    report = build(args.out, config=build_config(args))
    print(summary(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
