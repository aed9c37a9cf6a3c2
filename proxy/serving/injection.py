"""Prompt injection: a cached demonstration set put in front of a client's chat messages (as the
system message) or completion prompt (as a prefix).
"""

from __future__ import annotations

from typing import Any

from proxy.errors import APIError


def inject_chat(messages: list[Any], prefix: str) -> list[Any]:
    """Messages with the demonstrations as (or prepended to) the first system message."""
    out = list(messages)
    if out and isinstance(out[0], dict) and out[0].get("role") in ("system", "developer"):
        first = dict(out[0])
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = prefix + content
        elif isinstance(content, list):
            first["content"] = [{"type": "text", "text": prefix}, *content]
        else:
            first["content"] = prefix.rstrip()
        out[0] = first
    else:
        out.insert(0, {"role": "system", "content": prefix.rstrip()})
    return out


def check_completion_prompt(prompt: Any) -> None:
    """400 unless ``prompt`` is a string or a non-empty list of strings (text can be prefixed)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return
    raise APIError(400, "task models accept a string prompt or a list of strings (not token arrays)",
                   "invalid_prompt", param="prompt")


def inject_completion(prompt: Any, prefix: str) -> Any:
    """A completion prompt (string or list of strings) with the demonstrations as a prefix."""
    check_completion_prompt(prompt)
    if isinstance(prompt, str):
        return prefix + prompt
    return [prefix + p for p in prompt]
