"""What a trainer is given, made ready to train with: the policy (a name or a loaded model), the reward functions
(callables, reward models by name) and the prompt datasets, in `GRPOTrainer`'s call shape.

Names are resolved by `rgrl.models.loading.resolve_checkpoint` (local paths, Hub ids and rgrl's `tiny:`/`toy:`
checkpoints), so a name works the same as the trainer's `model`, in `reward_funcs` and as `guidance_model`.
"""

from __future__ import annotations

import contextlib
import logging

from rgrl.models.family import DiffusionFamily, resolve_family
from rgrl.models.loading import DLLMConfig, load_tokenizer
from rgrl.rewards import RewardModel, RewardModelConfig, RewardModelFunction, reward_name

logger = logging.getLogger(__name__)


def weights_dtype(args) -> str:
    """The dtype of models loaded by name when nothing else says: the mixed-precision setting's, else float32."""
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


@contextlib.contextmanager
def replicated_loading(args):
    """Load frozen reward models whole on every process: under a ZeRO-3 config, `from_pretrained` would otherwise
    partition them, and guidance needs every weight of the reward model on every process.

    The DeepSpeed config `from_pretrained` consults is `args.hf_deepspeed_config` when the arguments set
    `deepspeed`, and the one accelerate's DeepSpeed plugin holds under `accelerate launch` with a DeepSpeed config."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    plugin = getattr(args, "deepspeed_plugin", None)
    hf_deepspeed_config = getattr(args, "hf_deepspeed_config", None) or getattr(plugin, "dschf", None)
    if hf_deepspeed_config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_deepspeed_config)


def load_reward_model(config: RewardModelConfig, args) -> RewardModel:
    """A frozen reward model, whole on this process's device."""
    with replicated_loading(args):
        return config.load(args.device)


def load_policy(model, args, processing_class=None, family: DiffusionFamily | None = None):
    """The dLLM to train, its tokenizer and its family, from a name (loaded with `args.model_init_kwargs`, the
    fields of `DLLMConfig`) or a loaded model (tokenizer loaded from its name when not given, family inferred)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    kwargs = dict(args.model_init_kwargs or {})
    if isinstance(model, str):
        kwargs.setdefault("dtype", weights_dtype(args))
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        config = DLLMConfig(path=model, **kwargs)
        loaded = config.load(None if is_deepspeed_zero3_enabled() else args.device)
        model, tokenizer, family = loaded.model, processing_class or loaded.tokenizer, family or loaded.family
        if config.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.activation_checkpointing,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        return model, tokenizer, family
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a name (path, Hub id, tiny:/toy: name) or a loaded dLLM, got "
                        f"{type(model).__name__}.")
    tokenizer = processing_class or load_tokenizer(model.config.name_or_path, kwargs.get("trust_remote_code", False))
    overrides = {name: kwargs[name] for name in DLLMConfig(path="").family_overrides() if name in kwargs}
    return model, tokenizer, family or resolve_family(model.config, tokenizer, overrides)


def reward_functions(reward_funcs, args) -> list:
    """TRL's `reward_funcs` with every name (a reward model: path, Hub id, tiny:/toy: name) loaded as rgrl's
    `RewardModelFunction` (discrete scoring of the decoded completion, in `weights_dtype(args)`); one copy per name."""
    if reward_funcs is None:
        return []
    functions, loaded = [], {}
    for function in reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]:
        if isinstance(function, str):
            if function not in loaded:
                config = RewardModelConfig(path=function, dtype=weights_dtype(args),
                                           trust_remote_code=args.trust_remote_code)
                loaded[function] = load_reward_model(config, args)
            function = RewardModelFunction(loaded[function], reward_name(function), path=function)
        functions.append(function)
    return functions


def check_prompt_dataset(dataset, which: str) -> None:
    """A dataset of prompts (or a dict of them) must have a `prompt` column and at least one row."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for name, part in dataset.items():
            check_prompt_dataset(part, f"{which}[{name!r}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and "prompt" not in columns:
        raise ValueError(f"{which} has no 'prompt' column (columns: {columns}); rename the column holding the "
                         "prompts (text, or a list of chat messages) to 'prompt'.")
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{which} is empty: it needs at least one prompt.")
