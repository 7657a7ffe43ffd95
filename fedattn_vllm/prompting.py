"""Turn participants' texts into token segments, optionally inside one chat turn.

With a chat template the global prompt is a single user message whose content is the
concatenation of the parts. The template's head (system message, user header) is public
text: it becomes the session's public prefix, which every participant computes and sees
at every layer. The template's tail (end of turn, assistant header) goes to the last
participant, so every segment stays private text.
"""

from __future__ import annotations

import secrets


def chat_frame(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(head, tail) of the chat template around one user message's content."""
    mark = f"\x00{secrets.token_hex(16)}\x00"  # fresh each time: no text can contain it
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": mark}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, tail = rendered.split(mark)
    return head, tail


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prefix(tokenizer, system: str | None = None) -> list[int]:
    """Token ids of the chat template's head: the public prefix of a multi-party chat turn."""
    return _ids(tokenizer, chat_frame(tokenizer, system)[0])


def encode_part(tokenizer, text: str, index: int, count: int, *, chat: bool = False) -> list[int]:
    """Token ids of participant `index`'s part of `count` (with the chat template's tail if the last, in chat).

    Each participant can encode its own part alone: the template's head is the public prefix.
    """
    if chat and index == count - 1:
        text += chat_frame(tokenizer)[1]
    return _ids(tokenizer, text)


def encode_segments(tokenizer, parts: list[str], *, chat: bool = False,
                    system: str | None = None) -> tuple[list[int], list[list[int]]]:
    """(public prefix, each participant's segment) as token ids; the prefix is the chat head, or empty."""
    if not parts or any(not p for p in parts):
        raise ValueError("parts: every participant needs non-empty text")
    prefix = chat_prefix(tokenizer, system) if chat else []
    return prefix, [encode_part(tokenizer, p, n, len(parts), chat=chat) for n, p in enumerate(parts)]
