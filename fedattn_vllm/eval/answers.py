"""GSM8K answer extraction as in the paper's chain-of-thought format, and scoring."""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*\$?\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> str | None:
    """The number after the first "The answer is", else the last number in the text (None: no number)."""
    found = _ANSWER_IS.search(text)
    if found is not None:
        return _normalise(found.group(1))
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def _normalise(number: str) -> str | None:
    """"1,000" -> "1000", "18.0" -> "18", "0.50" -> "0.5"; None if it is not a number."""
    try:
        value = float(number.replace(",", "").rstrip("."))
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def is_correct(predicted: str | None, reference: str) -> bool:
    """Numeric equality of the extracted answer and the reference ("18", "1,000" and "18.0" alike)."""
    if predicted is None:
        return False
    try:
        return float(predicted) == float(reference.replace(",", ""))
    except ValueError:
        return False
