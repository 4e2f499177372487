"""Benchmarks whose results live in docs/results/: `python -m rgrl.bench NAME [options]`.

  toy     the paper's claims in the toy world: test-time guidance, an EntRGi ablation, RGRL vs diffu-GRPO (toy.py)
  speed   one denoising step taken apart — dLLM forward, guidance, sampling — at tiny, toy and full-size shapes,
          against the naive guidance, with the FLOP model of a paper-sized rollout (speed.py)
  cache   the sampler's cache mode (beyond the paper) in the toy world: quality against compute saved (cache.py)
  regimes when do EntRGi and RGRL win: sweeps over the toy world's difficulty, entropy and reward-model knobs
          (regimes.py)

Run from the repository root (the toy benchmark reads recipes/; the speed benchmark's oracle lives in tests/).
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"toy": "rgrl.bench.toy", "speed": "rgrl.bench.speed", "cache": "rgrl.bench.cache",
              "regimes": "rgrl.bench.regimes"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in BENCHMARKS:
        sys.exit(f"usage: python -m rgrl.bench {{{','.join(BENCHMARKS)}}} [options]  (--help after the name)\n\n"
                 + __doc__)
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
