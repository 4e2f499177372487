"""A frozen scalar reward model: discrete scoring of text, and the differentiable embedding path of guidance.

Any `AutoModelForSequenceClassification` with one label works (Skywork-Reward-V2-Qwen3 is
`Qwen3ForSequenceClassification`). How transformers' sequence classifiers pool (`GenericForSequenceClassification`):
the score head runs at every position and the sequence's score is read at
  - given `input_ids`: the rightmost position whose id is not `config.pad_token_id` -- right for both left and right
    padding, and a real final token equal to the pad id is skipped (the token before it is pooled);
  - given only `inputs_embeds`: the last position, whatever the attention mask says.
Discrete scoring therefore passes right-padded `input_ids` (real tokens keep positions 0..n-1, exactly as unbatched,
and no query row is fully masked). The embedding path right-aligns every row so that its last position is the
template's last real token (trailing pad-id tokens of the template are dropped, mirroring the id rule).
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, DynamicCache

from rgrl.models.loading import load_tokenizer, resolve_checkpoint, torch_dtype
from rgrl.rewards.template import Prompt, RewardTemplate


class _EmbedsPoolingNotice(logging.Filter):
    """Drops transformers' notice that classifiers cannot find padding in `inputs_embeds`: the embedding path
    right-aligns its rows on purpose, so pooling the last position is exactly what it wants."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not detect padding tokens in `inputs_embeds`" not in record.getMessage()


logging.getLogger("transformers.modeling_layers").addFilter(_EmbedsPoolingNotice())


class RewardModel:
    """Frozen sequence classifier with one label, in eval mode, plus its tokenizer and chat template.

    Args:
        model: an `AutoModelForSequenceClassification` instance with `config.num_labels == 1`.
        tokenizer: its tokenizer, with a chat template.
        max_length: longest RM input in tokens; longer conversations keep their end (the pooled token).
    """

    def __init__(self, model, tokenizer, max_length: int = 4096):
        _check_one_label(model.config)
        model.eval()
        model.requires_grad_(False)
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:  # classifiers refuse batches without a pad id to pool by
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is None:
                raise ValueError("The reward model has no pad token id in its config or tokenizer (and no EOS).")
            text_config.pad_token_id = pad
        self.model = model
        self.tokenizer = tokenizer
        self.pad_token_id = text_config.pad_token_id
        self.template = RewardTemplate(tokenizer, pad_token_id=self.pad_token_id)
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "bfloat16",
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        max_length: int = 4096,
        attn_implementation: str | None = "sdpa",
    ) -> RewardModel:
        """Load a reward model from a local directory, Hub id or `tiny:` name (see `rgrl.models.loading`)."""
        resolved = resolve_checkpoint(path)
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
        _check_one_label(config, path)  # before loading any weights
        kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForSequenceClassification.from_pretrained(resolved, config=config, **kwargs)
        if device is not None:
            model.to(device)
        return cls(model, load_tokenizer(path, trust_remote_code=trust_remote_code), max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def input_embeddings(self) -> torch.nn.Module:
        """The RM's token embedding module (its `.weight` is E_RM [V_RM, d_RM])."""
        return self.model.get_input_embeddings()

    @torch.no_grad()
    def score(self, prompts: list[Prompt], completions: list[str], batch_size: int = 8) -> torch.Tensor:
        """Discrete scores of `[..., user, assistant: completion]` pairs -> [B] float32 on the CPU.

        Each conversation is rendered with the RM's chat template and tokenized with its tokenizer; batches are
        formed from similar lengths and right-padded with the pad id the classifier pools by.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
        sequences = [self._keep_end(self.template.conversation_ids(p, c)) for p, c in zip(prompts, completions)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores = torch.empty(len(sequences), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[row, : len(sequences[i])] = 1
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
            scores[rows] = logits[:, 0].float().cpu()
        return scores

    def embedding_scorer(self, prompts: list[Prompt], num_slots: int) -> EmbeddingScorer:
        """The differentiable scorer for one generation batch: one prompt per row, `num_slots` response slots."""
        return EmbeddingScorer(self, prompts, num_slots)

    def _keep_end(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        warnings.warn(
            f"A reward-model input of {len(ids)} tokens exceeds max_length={self.max_length}; its start is cut.",
            stacklevel=3,
        )
        return ids[-self.max_length :]


class EmbeddingScorer:
    """Rewards of response embeddings placed into the RM's chat template; differentiable, built once per batch.

    Row i holds T columns: `[prefix_i | pads | L response slots | suffix_i]`, right-aligned so the last column is
    the template's last real token (the one a classifier given `inputs_embeds` pools). The attention mask hides the
    pads and every slot with keep=False; position ids are cumsum(mask) - 1, so the visible tokens sit at exactly
    the positions they would have in discrete scoring and the result equals `RewardModel.score` on the kept
    tokens. The suffix's first token is the template's end of turn; a response that ends with a stop token (slot
    `stop_slot`) puts that slot's embedding in its place, so the end of the response is read -- and receives
    gradient -- exactly where the discrete path has its end of turn. Pads sit after the prefix rather than at the far
    left so that no query row is fully masked: such rows are NaN-prone on some SDPA kernels, while a hidden pad behind
    the prefix changes nothing for the visible ones.

    The constructor embeds the fixed parts and, for a causal reward model (every attention module `is_causal`, and a
    forward that takes a key/value cache), runs the columns before the first response slot once and keeps their
    keys/values: nothing after them can change them, so every call runs only the remaining columns against that
    cache — the same scores and gradients for a fraction of the compute. Other reward models run all columns.
    """

    def __init__(self, reward_model: RewardModel, prompts: list[Prompt], num_slots: int):
        if num_slots < 1 or not prompts:
            raise ValueError(
                f"An embedding scorer needs prompts and num_slots >= 1, got {len(prompts)} and {num_slots}."
            )
        self.model = reward_model.model
        parts = [self._fit(reward_model, *reward_model.template.split_ids(p), num_slots) for p in prompts]
        batch, width = len(parts), max(len(pre) + num_slots + len(suf) for pre, suf in parts)
        fixed_ids = torch.full((batch, width), reward_model.pad_token_id, dtype=torch.long)
        fixed_mask = torch.zeros((batch, width), dtype=torch.bool)
        slot_columns = torch.empty((batch, num_slots), dtype=torch.long)
        end_of_turn_columns = torch.empty(batch, dtype=torch.long)
        for i, (prefix, suffix) in enumerate(parts):
            slots_start = width - len(suffix) - num_slots
            fixed_ids[i, : len(prefix)] = prefix
            fixed_ids[i, width - len(suffix) :] = suffix
            fixed_mask[i, : len(prefix)] = True
            fixed_mask[i, width - len(suffix) :] = True
            slot_columns[i] = torch.arange(slots_start, slots_start + num_slots)
            end_of_turn_columns[i] = width - len(suffix)
        device = reward_model.device
        with torch.no_grad():
            embeds = reward_model.input_embeddings(fixed_ids.to(device))
        self.base_embeds = embeds * fixed_mask.to(device).unsqueeze(-1)  # [B, T, d_RM], zeros at pads and slots
        self.base_mask = fixed_mask.to(device)  # [B, T]
        self.slot_columns = slot_columns.to(device)  # [B, L]
        self.end_of_turn_columns = end_of_turn_columns.to(device)  # [B], the suffix's first column
        self.rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, num_slots)  # [B, L]
        self.cache_argument = _cache_argument(self.model)
        self.cached_columns = int(slot_columns[:, 0].min()) if self.cache_argument else 0
        self.prefix_cache = None  # per layer (keys, values) of the first `cached_columns` columns
        if self.cached_columns:
            mask = self.base_mask[:, : self.cached_columns]
            with torch.no_grad():
                out = self.model(inputs_embeds=self.base_embeds[:, : self.cached_columns], attention_mask=mask.long(),
                                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
            self.prefix_cache = [(keys, values) for keys, values, *_ in out[self.cache_argument]]

    @staticmethod
    def _fit(reward_model: RewardModel, prefix: torch.Tensor, suffix: torch.Tensor, num_slots: int):
        """Cut the start of a prefix that would push a full-length response past max_length."""
        room = reward_model.max_length - num_slots - len(suffix)
        if room < 1:
            raise ValueError(
                f"max_length={reward_model.max_length} leaves no room for the prompt next to {num_slots} response "
                f"slots and a {len(suffix)}-token template suffix."
            )
        if len(prefix) > room:
            warnings.warn(
                f"A reward-model prompt of {len(prefix)} tokens plus {num_slots} response slots exceeds "
                f"max_length={reward_model.max_length}; the start of the prompt is cut.",
                stacklevel=4,
            )
            prefix = prefix[-room:]
        return prefix, suffix

    @property
    def num_slots(self) -> int:
        return self.slot_columns.shape[1]

    @property
    def input_shape(self) -> tuple[int, int]:
        """[rows, columns] of every reward-model forward this scorer runs (for cost accounting)."""
        return tuple(self.base_mask.shape)

    def __call__(self, response_embeds: torch.Tensor, keep: torch.Tensor,
                 stop_slot: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards [B] float32 (on `response_embeds`' device) of response embeddings [B, L, d_RM].

        keep [B, L] bool marks the response slots the RM sees (those before the first EOS/end-of-turn).
        stop_slot [B] long, optional: the slot holding the first stop token (L or more: none); its embedding stands in
        for the template's end-of-turn token, so it is read and receives gradient there. Without it (or for rows
        without a stop) the template's own end of turn ends the response. Gradients flow to `response_embeds`;
        they are exactly zero at slots that are neither kept nor a row's stop slot.
        """
        expected = tuple(self.slot_columns.shape)
        if tuple(response_embeds.shape[:2]) != expected or tuple(keep.shape) != expected:
            raise ValueError(
                f"Expected response embeddings [{expected[0]}, {expected[1]}, d] and keep {list(expected)}, got "
                f"{list(response_embeds.shape)} and {list(keep.shape)}."
            )
        values = response_embeds.to(self.base_embeds.device, self.base_embeds.dtype)
        embeds = self.base_embeds.index_put((self.rows, self.slot_columns), values)
        if stop_slot is not None:
            stop_slot = stop_slot.to(embeds.device)
            batch = torch.arange(len(stop_slot), device=embeds.device)
            stop_embeds = values[batch, stop_slot.clamp(max=self.num_slots - 1)]  # [B, d]
            template_end = embeds[batch, self.end_of_turn_columns]
            ends_with_stop = (stop_slot < self.num_slots).unsqueeze(-1)
            embeds = embeds.index_put((batch, self.end_of_turn_columns),
                                      torch.where(ends_with_stop, stop_embeds, template_end))
        mask = self.base_mask.index_put((self.rows, self.slot_columns), keep.to(self.base_mask.device, torch.bool))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.prefix_cache is None:
            logits = self.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids).logits
        else:
            start = self.cached_columns
            logits = self.model(inputs_embeds=embeds[:, start:], attention_mask=mask.long(),
                                position_ids=position_ids[:, start:], use_cache=True,
                                **{self.cache_argument: DynamicCache(self.prefix_cache)}).logits
        return logits[:, 0].to(response_embeds.device, torch.float32)


def _cache_argument(model) -> str | None:
    """The name under which the model's forward takes a key/value cache (`cache` in transformers 5, formerly
    `past_key_values`) when a later column can never change an earlier one's keys/values — every attention module
    is causal (Qwen3 and other decoder classifiers) — else None (e.g. BERT-style encoders)."""
    causal = [module.is_causal for module in model.modules() if hasattr(module, "is_causal")]
    if not causal or not all(flag is True for flag in causal):
        return None
    parameters = inspect.signature(type(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _check_one_label(config, name: str | None = None) -> None:
    num_labels = getattr(config, "num_labels", None)
    if num_labels != 1:
        where = f" {name!r}" if name else ""
        raise ValueError(
            f"The reward model{where} has num_labels={num_labels}; rgrl needs a scalar reward model "
            "(AutoModelForSequenceClassification with exactly one label, e.g. Skywork-Reward-V2)."
        )
