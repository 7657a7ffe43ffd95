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


def encode_segments(tokenizer, parts: list[str], *, chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Token ids of each participant's part (framed as one chat turn if `chat`)."""
    if not parts or any(not p for p in parts):
        raise ValueError("parts: every participant needs non-empty text")
    texts = list(parts)
    if chat:
        prefix, suffix = chat_frame(tokenizer, system)
        texts[0] = prefix + texts[0]
        texts[-1] = texts[-1] + suffix
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
