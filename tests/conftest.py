"""Test-session settings: offline, and one compute thread per process.

The tiny models gain nothing from intra-op parallelism, and the 2-core CI machine runs multi-process tests: more
OpenMP threads than cores make every process spin-wait (a 10x slowdown was measured). Set before torch loads, so
subprocesses (torchrun, accelerate) inherit it.
"""

import os

for name, value in {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)
