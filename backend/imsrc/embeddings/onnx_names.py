"""The exported towers' input and output names and the short text tower's token cut: what running an export
needs, without the exporter (and torch) behind it."""

from __future__ import annotations

from typing import Any

INPUT_NAMES = {"image": "pixels", "text": "tokens", "text-short": "tokens"}
OUTPUT_NAME = "features"
# Token positions of the short text tower (ShortTextTower): a query whose end-of-text token falls within them runs
# there instead of over all 77 positions; every check prompt fits.
SHORT_TEXT_TOKENS = 16


def short_tokens(tokens: Any) -> Any:
    """The tokens (a NumPy array or a torch tensor, (n, 77)) cut just after the batch's last end-of-text token
    (each row's highest id), when that falls within SHORT_TEXT_TOKENS; None otherwise (the full tower runs)."""
    last = int(tokens.argmax(-1).max())
    if last >= SHORT_TEXT_TOKENS:
        return None
    return tokens[:, : last + 1]
