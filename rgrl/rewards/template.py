"""How a reward model sees a conversation: its own chat template, rendered and tokenized.

Two views of the same conversation `[..., user, assistant: completion]`:

- discrete: the whole conversation rendered with the RM's chat template and tokenized at once;
- split: the conversation rendered with a placeholder as the assistant's content, cut at the placeholder into a
  prefix (everything up to the response) and a suffix (the template's end of turn), each tokenized. The response
  goes in between as embeddings (guidance), so the prefix and suffix are cached per prompt.

Both views tokenize rendered text the way `apply_chat_template(tokenize=True)` does (no special tokens added),
except that a tokenizer which prepends BOS on its own (LLaMA-style) gets exactly one BOS at the start, also when
its template does not write one. Qwen-style tokenizers add none.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

Prompt = str | list[dict]

# The assistant content used to cut the rendered template; must survive rendering verbatim.
RESPONSE_PLACEHOLDER = "<<rgrl-response-placeholder>>"


class TemplateError(ValueError):
    """A prompt or chat template cannot be rendered as the reward model needs."""


def as_messages(prompt: Prompt) -> list[dict]:
    """A user string or a list of chat messages ending with a user turn -> list of {role, content} dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise TemplateError(
            f"A prompt must be a string or a non-empty list of chat messages, got {type(prompt).__name__}."
        )
    for message in prompt:
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise TemplateError(f"Every chat message needs 'role' and 'content' keys, got {message!r}.")
    if prompt[-1]["role"] != "user":
        raise TemplateError(
            f"A prompt must end with a user turn, but its last message has role {prompt[-1]['role']!r}."
        )
    return list(prompt)


class RewardTemplate:
    """Renders and tokenizes conversations for one reward-model tokenizer; caches the per-prompt split view.

    Args:
        tokenizer: the reward model's tokenizer; it must have a chat template.
        pad_token_id: the id the classifier treats as padding when it pools (its config's `pad_token_id`);
            defaults to the tokenizer's pad id.
        cache_size: number of prompts whose prefix/suffix ids are kept (least recently used ones are dropped).
    """

    def __init__(self, tokenizer, pad_token_id: int | None = None, cache_size: int = 8192):
        if not tokenizer.chat_template:
            raise TemplateError("The reward model's tokenizer has no chat template; set `tokenizer.chat_template`.")
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.bos_token_id = bos if bos is not None and tokenizer("a").input_ids[:1] == [bos] else None
        self.pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.cache_size = cache_size
        self._split_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    def render(self, prompt: Prompt, completion: str) -> str:
        """The conversation `[..., user, assistant: completion]` as text, in the RM's chat template."""
        messages = as_messages(prompt) + [{"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def encode(self, text: str, at_start: bool = True) -> list[int]:
        """Token ids of rendered text: no special tokens added, but one BOS at the start if the tokenizer uses one."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if at_start and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def conversation_ids(self, prompt: Prompt, completion: str) -> list[int]:
        """Discrete view: ids of the whole rendered conversation."""
        return self.encode(self.render(prompt, completion))

    @property
    def end_of_turn_id(self) -> int:
        """The token the template writes right after the assistant's content (Qwen3: `<|im_end|>`): the first token
        of the split view's suffix. Guidance puts the first stop slot of a response in its place."""
        return int(self.split_ids("x")[1][0])

    def split_ids(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """Split view (cached per prompt): ids of the template before and after the assistant's content.

        The suffix drops trailing pad-id tokens: an HF sequence classifier given input ids pools the last token
        that is not the pad id, so a suffix ending in one is scored at the token before it.
        Returns (prefix_ids [P] long, suffix_ids [S] long), both on the CPU.
        """
        key = json.dumps(as_messages(prompt), sort_keys=True, ensure_ascii=False)
        if key in self._split_cache:
            self.cache_hits += 1
            self._split_cache.move_to_end(key)
            return self._split_cache[key]
        self.cache_misses += 1
        text = self.render(prompt, RESPONSE_PLACEHOLDER)
        if text.count(RESPONSE_PLACEHOLDER) != 1:
            raise TemplateError(
                "The reward model's chat template does not insert the assistant's content verbatim exactly once; "
                "cannot split it into a prefix and a suffix around the response."
            )
        prefix, suffix = text.split(RESPONSE_PLACEHOLDER)
        suffix_ids = self.encode(suffix, at_start=False)
        while suffix_ids and suffix_ids[-1] == self.pad_token_id:
            suffix_ids.pop()
        if not suffix_ids:
            raise TemplateError(
                "The reward model's chat template writes nothing (but padding) after the assistant's content, so a "
                "guided response could not end at a real token for the classifier to pool."
            )
        entry = (torch.tensor(self.encode(prefix), dtype=torch.long), torch.tensor(suffix_ids, dtype=torch.long))
        self._split_cache[key] = entry
        if len(self._split_cache) > self.cache_size:
            self._split_cache.popitem(last=False)
        return entry
