"""Stop strings over a reply that grows token by token.

A stop string can span several tokens ("\\n\\nUser" may be "\\n", "\\n", "User"), so matching works on
the decoded text, never on token ids. While streaming, text is sent only when no later token can
turn it into (part of) a stop string: a tail that is a prefix of some stop string is held back, as is
a tail of U+FFFD (bytes of a UTF-8 character whose remaining bytes are still to come).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index in `text` where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def unfinished_char_len(text: str) -> int:
    """Trailing U+FFFD characters: a multi-byte character cut between tokens decodes as these for now."""
    return len(text) - len(text.rstrip(REPLACEMENT_CHAR))


class StopText:
    """The sendable part of a reply, fed with its whole decoded text after every step.

    `update(text)` returns the new text that is safe to send (a delta) and sets `stopped` once a stop
    string appears; the reply then ends just before it. `update(text, final=True)` releases the rest.
    The concatenated deltas always equal `sent`, which is the reply's text at the end.
    """

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.sent = ""
        self.stopped = False

    def update(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        cut = find_stop(text, self.stops)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        if not final:
            hold = max(partial_stop_len(text, self.stops), unfinished_char_len(text))
            text = text[: len(text) - hold]
        return self._advance(text)

    def _advance(self, visible: str) -> str:
        if not visible.startswith(self.sent):
            # Decoding more tokens changed text already sent (not seen with byte-level BPE tokenizers):
            # keep what was sent and wait until the text extends it again.
            log.debug("decoded text no longer extends the sent text; holding back")
            return ""
        delta = visible[len(self.sent):]
        self.sent = visible
        return delta
