"""The OpenAI `logprobs` block of a choice, from vLLM's per-token logprobs ({token id: Logprob} per position, the
generated token first, then the top alternatives by rank), in the shapes vLLM's server gives."""

from __future__ import annotations

from collections.abc import Callable

FLOOR = -9999.0  # what OpenAI and vLLM report for a log-probability of -inf (JSON has no infinity)


def choice_logprobs(token_ids: list[int], logprobs: list[dict], top: int, kind: str,
                    decode: Callable[[int], str], text_offset: int = 0) -> dict:
    """`kind` 'text_completion': the legacy shape (tokens, token_logprobs, top_logprobs with every entry vLLM
    returned: the generated token and the `top` best, text_offset from `text_offset`, where these tokens start in
    the answer); 'chat.completion': content (token, logprob, bytes, top_logprobs: the first `top` entries)."""
    positions = []
    for token, position in zip(token_ids, logprobs):
        def text(t: int) -> str:
            return position[t].decoded_token if position[t].decoded_token is not None else decode(t)

        entries = [(text(t), max(lp.logprob, FLOOR)) for t, lp in position.items()]
        positions.append((text(token), max(position[token].logprob, FLOOR), entries))
    if kind == "text_completion":
        offsets, offset = [], text_offset
        for piece, _, _ in positions:
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": [p for p, _, _ in positions], "token_logprobs": [lp for _, lp, _ in positions],
                "top_logprobs": [dict(entries) for _, _, entries in positions], "text_offset": offsets}
    return {"content": [{"token": piece, "logprob": lp, "bytes": _bytes(piece),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": _bytes(t)} for t, v in entries[:top]]}
                        for piece, lp, entries in positions]}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
