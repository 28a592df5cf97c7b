"""Chat-template rendering and the assistant-only loss mask: what turns a conversation into model text,
for the sft_data stage (text and token counts) and for training (input ids and labels)."""

from __future__ import annotations

import threading

CHATML = "chatml"  # built-in ChatML renderer, no tokenizer (the dry-run engine's default)


class ChatRenderer:
    """Renders messages with a tokenizer's chat template and counts tokens; `chatml` needs no tokenizer."""

    def __init__(self, name: str):
        self.name = name
        self.tokenizer = None
        if name != CHATML:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(name)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"tokenizer {name} has no chat template; set sft.chat_template_model")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self.tokenizer is None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


_renderers: dict[str, ChatRenderer] = {}
_renderers_lock = threading.Lock()


def get_renderer(name: str) -> ChatRenderer:
    """One tokenizer per process and model, shared by every shard."""
    with _renderers_lock:
        if name not in _renderers:
            _renderers[name] = ChatRenderer(name)
        return _renderers[name]


def assistant_token_mask(tokenizer, messages: list[dict[str, str]], max_length: int | None = None
                         ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation: labels are the token ids on assistant turns (their text and
    end-of-turn marker) and -100 elsewhere. Spans come from rendering each prefix of the conversation, so
    any chat template works (SmolLM2's has no {% generation %} markers, which TRL's assistant_only_loss
    needs)."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise ValueError("chat template does not render conversations prefix by prefix; cannot mask turns")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [-100] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b <= a:
            continue
        if any(s <= a < e for s, e in spans):
            labels[k] = ids[k]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
