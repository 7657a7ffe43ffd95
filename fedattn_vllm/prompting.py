"""Turn participants' texts into token segments, optionally inside one chat turn.

With a chat template the global prompt is a single user message whose content is the
concatenation of the parts: the template's prefix goes to the first participant and its
suffix (end of turn, assistant header) to the last, so every segment stays private text.
"""

from __future__ import annotations

_MARK = "\x00FEDATTN_CONTENT\x00"


def chat_frame(tokenizer, system: str | None = None) -> tuple[str, str]:
    """(prefix, suffix) of the chat template around one user message's content."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": _MARK}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix, suffix = rendered.split(_MARK)
    return prefix, suffix


def encode_part(tokenizer, text: str, index: int, count: int, *, chat: bool = False,
                system: str | None = None) -> list[int]:
    """Token ids of participant `index`'s part of `count` (framed as one chat turn if `chat`).

    Each participant can encode its own part alone: only the first needs the template's
    prefix and only the last its suffix.
    """
    if chat:
        prefix, suffix = chat_frame(tokenizer, system)
        text = (prefix if index == 0 else "") + text + (suffix if index == count - 1 else "")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_segments(tokenizer, parts: list[str], *, chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Token ids of each participant's part (framed as one chat turn if `chat`)."""
    if not parts or any(not p for p in parts):
        raise ValueError("parts: every participant needs non-empty text")
    return [encode_part(tokenizer, p, n, len(parts), chat=chat, system=system) for n, p in enumerate(parts)]
