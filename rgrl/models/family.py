"""Family adapters: everything that differs between masked diffusion LM families, in one small object.

Downstream code (sampling, guidance, trainers) is family-agnostic; it asks a `DiffusionFamily` for the mask
token, the stop tokens, how to align logits with positions, which modules LoRA should target, and how to
render a chat prompt. Known families (Dream, LLaDA) are recognised by their config's `model_type`; any other
masked diffusion LM works when the recipe supplies the missing settings explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rgrl.models.layers import MaskedLMForward, PromptCache

# Chat templates shaped like the real checkpoints' ones; used by the tiny fixtures and as a fallback for a
# tokenizer that ships none.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{%- if loop.index0 == 0 %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

DREAM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LLaDA's `ff_out` names both a block projection and the LM head (`model.transformer.ff_out`): a regex that
# must match the full module name restricts LoRA to the seven projections inside the blocks.
LLADA_LORA_TARGETS = r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"


def before_first_stop(ids: torch.Tensor, stop_token_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a response ends: [B, L] ids -> (before [B, L] bool, the slots strictly before the first stop token;
    stop_slot [B] long, that token's slot, L when there is none)."""
    is_stop = torch.isin(ids, torch.tensor(stop_token_ids, device=ids.device))
    before = is_stop.long().cumsum(dim=-1) == 0
    return before, before.sum(dim=-1)


@dataclass(frozen=True)
class FamilyDefaults:
    """What is known about a family before looking at a concrete checkpoint."""

    name: str
    model_type: str
    mask_token: str
    end_of_turn_token: str | None
    shifted_logits: bool
    lora_target_modules: str | tuple[str, ...]
    chat_template: str


KNOWN_FAMILIES = {
    "dream": FamilyDefaults(
        name="dream",
        model_type="Dream",
        mask_token="<|mask|>",
        end_of_turn_token="<|im_end|>",
        shifted_logits=True,
        lora_target_modules=DREAM_LORA_TARGETS,
        chat_template=QWEN_CHAT_TEMPLATE,
    ),
    "llada": FamilyDefaults(
        name="llada",
        model_type="llada",
        mask_token="<|mdm_mask|>",
        end_of_turn_token="<|eot_id|>",
        shifted_logits=False,
        lora_target_modules=LLADA_LORA_TARGETS,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    ),
}


class FamilyError(ValueError):
    """A model or tokenizer lacks something rgrl needs; the message says what and how to supply it."""


@dataclass(frozen=True)
class DiffusionFamily:
    """Resolved settings of one dLLM + tokenizer pair.

    Attributes:
        name: family name ("dream", "llada", or a user-chosen name for other models).
        mask_token_id: id of the mask token that fills the canvas.
        eos_token_id: end-of-sequence id (also the pad id when the tokenizer has no pad token).
        end_of_turn_token_id: end-of-turn id of the chat template, or None.
        pad_token_id: id used for left padding of prompts (always hidden by the attention mask).
        shifted_logits: True when the logit at position i predicts token i+1 (Dream, AR-initialised).
        num_tokens: number of ids the tokenizer defines; logit rows at or beyond it are no token.
        lora_target_modules: default LoRA targets (peft list of names, or a full-match regex).
        chat_template: Jinja template used when the tokenizer ships none.
    """

    name: str
    mask_token_id: int
    eos_token_id: int
    end_of_turn_token_id: int | None
    pad_token_id: int
    shifted_logits: bool
    num_tokens: int
    lora_target_modules: str | tuple[str, ...]
    chat_template: str | None = field(default=None, repr=False)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a completion: EOS and, if the family has one, end-of-turn."""
        ids = (self.eos_token_id, self.end_of_turn_token_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def aligned_logits(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """[B, L, V] raw logits -> [B, L - start, V] where row j is the prediction for position start + j.

        Dream predicts token i+1 at position i, so position i's prediction sits at row i-1 (position 0, always a
        prompt token, reuses its own row). LLaDA's logits are already aligned. Slicing from `start` (e.g. the
        first completion slot) avoids materialising the prompt rows.
        """
        if not self.shifted_logits:
            return logits[:, start:]
        if start >= 1:
            return logits[:, start - 1 : -1]
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def completion_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_slots: int):
        """One forward of `model` -> aligned logits [B, num_slots, V] of the last `num_slots` positions."""
        slots = input_ids.new_ones((input_ids.shape[0], num_slots), dtype=torch.bool)
        return self.slot_logits(model, input_ids, attention_mask, slots).unflatten(0, slots.shape)

    def slot_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, slots: torch.Tensor,
                    prompt_cache: PromptCache | None = None):
        """One forward of `model` -> aligned logits [N, V] of the N slots where `slots` [B, S] is True.

        input_ids/attention_mask: [B, T] with the S completion slots last (after a non-empty prompt); rows of the
        result follow `slots` in row-major order. rgrl's native models send only those N hidden states through the
        LM head — for a shifted family the row before each slot. With a `prompt_cache` (native models only; its
        length from `cacheable_prompt_length`) that is not filling, only the positions after the cached ones run.
        """
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[:, -slots.shape[1]:] = slots
        if self.shifted_logits:
            keep = keep.roll(-1, dims=1)  # position i's prediction is the logit at i - 1
        if not _packs_slot_logits(model):
            if prompt_cache is not None:
                raise FamilyError("The prompt cache needs rgrl's native Dream or LLaDA model.")
            return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]
        if prompt_cache is not None and not prompt_cache.filling:
            input_ids, keep = input_ids[:, prompt_cache.length:], keep[:, prompt_cache.length:]
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                     prompt_cache=prompt_cache).logits

    def cacheable_prompt_length(self, prompt_length: int) -> int:
        """How many leading positions a prompt cache can hold: the whole prompt, or all but its last position for a
        shifted family (that position predicts the first completion slot, so it runs with the completion)."""
        return prompt_length - 1 if self.shifted_logits else prompt_length

    def render_prompt(self, tokenizer, messages: list[dict] | str) -> str:
        """Render a user prompt (text or chat messages) with the chat template, ready for the assistant turn."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        template = tokenizer.chat_template or self.chat_template
        if template is None:
            raise FamilyError(
                f"The tokenizer of family '{self.name}' has no chat template. Set `tokenizer.chat_template`, or "
                "give `model.chat_template` in the recipe."
            )
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )


def _packs_slot_logits(model) -> bool:
    """Whether the model takes a boolean `logits_to_keep` (rgrl's native Dream and LLaDA), through peft's wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return isinstance(base, MaskedLMForward)


def _token_id(tokenizer, token: str | None) -> int | None:
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return token_id


def resolve_family(config, tokenizer, overrides: dict | None = None) -> DiffusionFamily:
    """Build the `DiffusionFamily` for a model config and its tokenizer.

    `overrides` (from the recipe's `model` section) may set `family`, `mask_token_id`, `eos_token_id`,
    `end_of_turn_token_id`, `shifted_logits`, `lora_target_modules` and `chat_template`. A family is
    recognised from `config.model_type`; for any other model, `shifted_logits` and a mask token must be given.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    family_name = overrides.pop("family", None)
    if family_name in (None, "auto"):
        by_type = {d.model_type: d for d in KNOWN_FAMILIES.values()}
        defaults = by_type.get(getattr(config, "model_type", None))
    elif family_name in KNOWN_FAMILIES:
        defaults = KNOWN_FAMILIES[family_name]
    else:
        defaults = None
    if defaults is None:
        missing = [k for k in ("shifted_logits", "lora_target_modules") if k not in overrides]
        if missing:
            raise FamilyError(
                f"Unknown dLLM family for model_type '{getattr(config, 'model_type', None)}'"
                f"{f' (family: {family_name})' if family_name else ''}. Set `model.family` to one of "
                f"{sorted(KNOWN_FAMILIES)}, or describe the model in the recipe's `model` section: "
                f"{', '.join(missing)} (and `mask_token_id` if neither its config nor tokenizer declares one)."
            )
        defaults = FamilyDefaults(
            name=family_name or str(getattr(config, "model_type", "custom")),
            model_type=getattr(config, "model_type", ""),
            mask_token=None,
            end_of_turn_token=None,
            shifted_logits=overrides["shifted_logits"],
            lora_target_modules=overrides["lora_target_modules"],
            chat_template=None,
        )

    mask_from_config = getattr(config, "mask_token_id", None)
    mask_from_tokenizer = _token_id(tokenizer, defaults.mask_token) or tokenizer.mask_token_id
    mask_token_id = overrides.get("mask_token_id", mask_from_config or mask_from_tokenizer)
    if mask_token_id is None:
        raise FamilyError(
            f"The dLLM ({defaults.name}) has no mask token: its config has no `mask_token_id` and its tokenizer "
            f"defines no mask token{f' ({defaults.mask_token!r})' if defaults.mask_token else ''}. "
            "Set `model.mask_token_id` in the recipe."
        )
    if "mask_token_id" not in overrides and None not in (mask_from_config, mask_from_tokenizer):
        if mask_from_config != mask_from_tokenizer:
            raise FamilyError(
                f"Mask token mismatch: config.mask_token_id={mask_from_config} but the tokenizer's mask token "
                f"has id {mask_from_tokenizer}. Set `model.mask_token_id` in the recipe to the right one."
            )
    vocab_rows = getattr(config, "vocab_size", None)
    if vocab_rows is not None and not 0 <= mask_token_id < vocab_rows:
        raise FamilyError(f"mask_token_id {mask_token_id} is outside the model's vocabulary of {vocab_rows} rows.")

    eos_token_id = overrides.get("eos_token_id", tokenizer.eos_token_id)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        raise FamilyError(
            f"The dLLM ({defaults.name}) has no EOS token in its tokenizer or config. Set `model.eos_token_id`."
        )
    end_of_turn_token_id = overrides.get("end_of_turn_token_id", _token_id(tokenizer, defaults.end_of_turn_token))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id

    return DiffusionFamily(
        name=defaults.name,
        mask_token_id=int(mask_token_id),
        eos_token_id=int(eos_token_id),
        end_of_turn_token_id=None if end_of_turn_token_id is None else int(end_of_turn_token_id),
        pad_token_id=int(pad_token_id),
        shifted_logits=bool(overrides.get("shifted_logits", defaults.shifted_logits)),
        num_tokens=len(tokenizer),
        lora_target_modules=_as_targets(overrides.get("lora_target_modules", defaults.lora_target_modules)),
        chat_template=overrides.get("chat_template", defaults.chat_template),
    )


def _as_targets(targets) -> str | tuple[str, ...]:
    return targets if isinstance(targets, str) else tuple(targets)

