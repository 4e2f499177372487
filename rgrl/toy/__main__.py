"""`python -m rgrl.toy build [--out DIR] [--quick]`: build the toy world's checkpoints (see rgrl.toy.build);
`python -m rgrl.toy tiny OUT_DIR [--only NAME…]`: write the tiny random checkpoints (see rgrl.toy.tiny)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rgrl.toy.build import DEFAULT_OUT, GUIDED_EVALS, build
from rgrl.toy.tiny import TINY_CHECKPOINTS, build_tiny_checkpoint


def summary(report: dict) -> str:
    """The measured numbers of a build report, one line per checkpoint."""
    lines = []
    for name, entry in report["checkpoints"].items():
        if "heldout_pair_accuracy" in entry:
            lines.append(f"{name:9s} {entry['parameters']:>8,d} params  held-out pair accuracy "
                         f"{entry['heldout_pair_accuracy']:.3f}")
            continue
        line = (f"{name:9s} {entry['parameters']:>8,d} params  sampled pass rate {entry['base']['pass_rate']:.3f} "
                f"(RM {entry['base']['reward']:+.2f})")
        for method in GUIDED_EVALS:
            if f"{method}_m1" in entry:
                guided = entry[f"{method}_m1"]
                line += f"  {method} M=1: {guided['pass_rate']:.3f} (RM {guided['reward']:+.2f})"
        lines.append(line)
    lines.append(f"built in {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rgrl.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="train the toy dLLMs and reward models")
    build_parser.add_argument("--out", default=str(DEFAULT_OUT),
                              help=f"output directory (default: the shipped checkpoints, {DEFAULT_OUT})")
    build_parser.add_argument("--quick", action="store_true",
                              help="a reduced world in seconds, for smoke tests (its numbers mean nothing)")
    tiny_parser = commands.add_parser("tiny", help="write the tiny random checkpoints (what tiny:<name> builds)")
    tiny_parser.add_argument("out_dir", help="directory that receives one sub-directory per checkpoint")
    tiny_parser.add_argument("--only", choices=TINY_CHECKPOINTS, nargs="*", default=list(TINY_CHECKPOINTS))
    args = parser.parse_args(argv)
    if args.command == "tiny":
        for name in args.only:
            print(f"{name}: {build_tiny_checkpoint(name, Path(args.out_dir) / name)}")
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    report = build(args.out, quick=args.quick)
    print(summary(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
