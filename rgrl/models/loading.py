"""Loading dLLMs and tokenizers from a local directory, a Hub id, or a name of a registered checkpoint scheme.

Checkpoint names understood everywhere a model path is accepted:
    /abs/or/relative/dir    a local model directory (must exist)
    org/name                a Hugging Face Hub id (downloaded by transformers, or taken from its cache)
    <scheme>:<name>         a checkpoint of a scheme registered with `register_checkpoint_scheme`

`import rgrl` registers rgrl's own schemes (in `rgrl.toy`): `tiny:<name>`, a tiny random checkpoint built on
first use, and `toy:<name>`, a trained checkpoint of the toy world shipped with rgrl. The model layer itself knows
no scheme, so nothing here imports the packages that build checkpoints.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from transformers import CONFIG_MAPPING, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from rgrl.models.family import DiffusionFamily, resolve_family

# Full-size architecture configs, identical to the real Hub config.json files.
ARCHITECTURES = {
    "dream-v0-instruct-7b": "dream_v0_instruct_7b.json",
    "llada-8b-instruct": "llada_8b_instruct.json",
    "skywork-reward-v2-qwen3-0.6b": "skywork_reward_v2_qwen3_0.6b.json",
    "skywork-reward-v2-qwen3-1.7b": "skywork_reward_v2_qwen3_1.7b.json",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SCHEME = re.compile(r"^[a-z][a-z0-9_]*$")

# scheme -> resolver(name) returning a model directory; filled by `register_checkpoint_scheme`
CHECKPOINT_SCHEMES: dict[str, Callable[[str], str | os.PathLike]] = {}


def register_checkpoint_scheme(scheme: str, resolver: Callable[[str], str | os.PathLike]) -> None:
    """Make `<scheme>:<name>` a checkpoint name wherever a model path is accepted.

    `resolver(name)` returns the model directory (building it first if it must) or raises FileNotFoundError /
    ValueError naming the fix. Registering the same resolver again is a no-op (a module imported twice); another
    resolver for a taken scheme is an error.
    """
    if not _SCHEME.match(scheme):
        raise ValueError(f"Checkpoint scheme {scheme!r} must be lower-case letters, digits and '_' (e.g. 'toy').")
    registered = CHECKPOINT_SCHEMES.get(scheme)
    if registered is not None and _qualified_name(registered) != _qualified_name(resolver):
        raise ValueError(f"Checkpoint scheme {scheme!r}: is already registered to {_qualified_name(registered)}.")
    CHECKPOINT_SCHEMES[scheme] = resolver


def _qualified_name(function) -> str:
    return f"{function.__module__}.{function.__qualname__}"


def architecture_config(name: str, **overrides) -> PretrainedConfig:
    """The config of a full-size architecture (`ARCHITECTURES`), with optional field overrides."""
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}.")
    text = resources.files("rgrl.models").joinpath("configs", ARCHITECTURES[name]).read_text()
    fields = {**json.loads(text), **overrides}
    return CONFIG_MAPPING[fields["model_type"]].from_dict(fields)


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """Turn a checkpoint name (module docstring) into something `from_pretrained` accepts.

    Raises FileNotFoundError with a clear message for a local path that does not exist.
    """
    path = os.fspath(path)
    scheme, colon, name = path.partition(":")
    if colon and scheme in CHECKPOINT_SCHEMES:
        return str(CHECKPOINT_SCHEMES[scheme](name))
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded) or not _HUB_ID.match(path):
        schemes = ", ".join(f"{s}:<name>" for s in sorted(CHECKPOINT_SCHEMES)) or "none registered"
        raise FileNotFoundError(
            f"Model path {path!r} is not a model directory, nor a Hub id 'org/name', nor a name of a registered "
            f"checkpoint scheme ({schemes})."
        )
    return path


def offline_hub_problem(path: str) -> str | None:
    """When Hub access is off (HF_HUB_OFFLINE=1) and `path` is a Hub id missing from the local cache: what to do."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or os.path.exists(os.path.expanduser(path)) or not _HUB_ID.match(path):
        return None
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None
    return (f"the Hub model {path!r} is not in the local Hugging Face cache and Hub access is off "
            f"(HF_HUB_OFFLINE=1). Download it where there is internet into the cache this machine reads (same "
            f"HF_HOME): `hf download {path}`, or set the path to a local copy of the model folder")


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a safetensors file (a header or data length that does not fit), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)
    except Exception as error:  # safetensors raises its own error types (SafetensorError, OSError)
        return f"not a readable safetensors file ({error})"
    return None


def check_model_dir(path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Fail with the file and the fix, before any weights load, when a local model folder cannot load: a missing
    or malformed config.json, a `model_type` neither transformers nor rgrl knows, a truncated safetensors file."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a model folder is what `save_pretrained` writes.")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file}: not valid JSON ({error}).") from None
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and config.get("auto_map")):
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is known neither to transformers nor to rgrl (rgrl's native "
            "families: 'Dream' for Dream, 'llada' for LLaDA). For a Dream or LLaDA checkpoint, set \"model_type\" "
            "in that file to 'Dream' or 'llada'. For another masked diffusion LM that ships its own modeling code "
            "(`auto_map` in config.json), set `model.trust_remote_code: true` and describe its family in the recipe "
            "(`model.family`, `mask_token_id`, `eos_token_id`, `shifted_logits`, `lora_target_modules`)."
        )
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ValueError(f"{weights}: {problem}; copy or download the checkpoint again.")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer of a checkpoint, set up for left-padded prompts."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class DLLMConfig:
    """The recipe's `model` section: which dLLM to load and how (also the family overrides of `resolve_family`)."""

    path: str  # local model folder, Hub id 'org/name', or tiny:/toy: name
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # weights' dtype
    attn_implementation: str | None = "sdpa"  # sdpa, eager, flash_attention_2 (None: transformers' choice)
    load_in_4bit: bool = False  # QLoRA: NF4 weights (CUDA and bitsandbytes)
    trust_remote_code: bool = False  # run the checkpoint's own modeling code (models rgrl does not know)
    adapter: str | None = None  # a trained LoRA adapter directory to apply (evaluation of a trained policy)
    # family overrides, for models rgrl does not know (see rgrl.models.family.resolve_family)
    family: str = "auto"  # dream, llada, or auto (from config.model_type)
    mask_token_id: int | None = None  # the mask token (default: the family's)
    eos_token_id: int | None = None  # the tokenizer's end of text (default: the family's)
    end_of_turn_token_id: int | None = None  # the chat template's end of turn (default: the family's)
    shifted_logits: bool | None = None  # logits at position i predict token i+1 (Dream) (default: the family's)
    lora_target_modules: list[str] | str | None = None  # LoRA targets (default: the family's projections)
    chat_template: str | None = None  # Jinja chat template (default: the tokenizer's)

    def family_overrides(self) -> dict:
        names = ("family", "mask_token_id", "eos_token_id", "end_of_turn_token_id", "shifted_logits",
                 "lora_target_modules", "chat_template")
        return {name: getattr(self, name) for name in names}

    def check_paths(self) -> None:
        """Fail fast (before any weights load) on local paths that do not exist or cannot load."""
        resolved = resolve_checkpoint(self.path)
        if os.path.isdir(resolved):
            check_model_dir(resolved, self.trust_remote_code)
        if self.adapter is not None and not os.path.isdir(os.path.expanduser(self.adapter)):
            raise FileNotFoundError(f"LoRA adapter directory {self.adapter!r} does not exist.")

    def load(self, device: str | torch.device | None = None) -> "LoadedDLLM":
        loaded = load_dllm(self.path, dtype=self.dtype, device=device, attn_implementation=self.attn_implementation,
                           load_in_4bit=self.load_in_4bit, trust_remote_code=self.trust_remote_code,
                           family_overrides=self.family_overrides())
        if self.adapter is not None:
            from peft import PeftModel

            loaded.model = PeftModel.from_pretrained(loaded.model, os.path.expanduser(self.adapter))
        return loaded


@dataclass
class LoadedDLLM:
    model: PreTrainedModel
    tokenizer: object
    family: DiffusionFamily


def load_dllm(
    path: str,
    dtype: str = "bfloat16",
    device: str | torch.device | None = None,
    attn_implementation: str | None = "sdpa",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    family_overrides: dict | None = None,
) -> LoadedDLLM:
    """Load a masked diffusion LM, its tokenizer and its family adapter.

    Dream and LLaDA load through rgrl's native classes (no remote code, also when the config carries the Hub's
    `auto_map`); any other dLLM needs `trust_remote_code=True` or a registered class, plus family overrides.
    """
    resolved = resolve_checkpoint(path)
    if os.path.isdir(resolved):
        check_model_dir(resolved, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(torch_dtype(dtype))
        kwargs["device_map"] = {"": device if device is not None else _default_device()}
    model = AutoModel.from_pretrained(resolved, **kwargs)
    if not load_in_4bit and device is not None:
        model.to(device)
    family = resolve_family(model.config, tokenizer, family_overrides)
    return LoadedDLLM(model=model, tokenizer=tokenizer, family=family)


def num_logit_rows(model) -> int:
    """V, the number of logit rows (output embedding rows) of a dLLM, also when ZeRO-3 partitions the weight."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _four_bit_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError("load_in_4bit needs bitsandbytes: pip install 'rgrl[quant]'.") from error
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit needs a CUDA GPU (bitsandbytes NF4 kernels); set load_in_4bit: false on CPU.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
