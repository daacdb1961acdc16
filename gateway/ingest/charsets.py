"""Last-resort charset guess for bytes whose declared charset lies (issue 12)."""

from __future__ import annotations

from charset_normalizer import from_bytes

# Detection reads the whole payload; past this the guess costs more than the mojibake.
GUESS_MAX_BYTES = 512 * 1024
# Below this a detector guesses at random (an RFC 2047 word, a name).
GUESS_MIN_BYTES = 16


def guess_decode(data: bytes) -> str | None:
    """The text charset-normalizer finds most plausible, or None when it has no good guess.

    Only called after the declared charset and UTF-8 both failed to decode strictly, so
    the usual mail never pays for detection.
    """
    if len(data) < GUESS_MIN_BYTES or len(data) > GUESS_MAX_BYTES:
        return None
    best = from_bytes(data).best()
    if best is None:
        return None
    return str(best)
