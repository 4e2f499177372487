"""Merge a trained LoRA adapter into its base dLLM: a plain model directory that `from_pretrained` loads.

    python -m rgrl.merge ADAPTER_DIR OUT_DIR [--base MODEL] [--dtype bfloat16]

ADAPTER_DIR is a training `output_dir` (the final adapter) or one of its `checkpoint-N` folders. The base model
is the one recorded in the adapter's config unless `--base` names another copy (a path, Hub id or tiny: name).
An adapter trained on a 4-bit (QLoRA) base is merged into the full-precision base weights. OUT_DIR must not
exist; it appears complete or not at all.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
                  dtype: str = "bfloat16", trust_remote_code: bool = False) -> Path:
    """Write base + adapter (merged) and the tokenizer to `out_dir`; returns it."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from rgrl.models.loading import load_dllm

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json).")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new output directory.")
    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    loaded = load_dllm(base, dtype=dtype, attn_implementation=None, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload()
    tokenizer = loaded.tokenizer
    if (adapter_dir / "tokenizer_config.json").is_file():  # the trainer saves the tokenizer it used
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="training output_dir or checkpoint-N folder with the LoRA adapter")
    parser.add_argument("out_dir", help="new directory for the merged model")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter config)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.adapter_dir, args.out_dir, args.base, args.dtype, args.trust_remote_code)
    except (FileNotFoundError, FileExistsError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"Merged model written to {out}")


if __name__ == "__main__":
    main()
