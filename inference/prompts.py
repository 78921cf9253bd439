"""Turning a request's prompt into the token ids a model sees."""

from __future__ import annotations

from typing import Any

from inference.errors import EngineError


def encode_prompt(tokenizer: Any, prompt: str, *, system: str | None, raw: bool) -> list[int]:
    """Token ids for ``prompt`` with a Hugging Face tokenizer: through the model's chat
    template (with the optional system message) unless ``raw`` or the model has none."""
    if tokenizer is None:
        raise EngineError("engine not started")
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)
