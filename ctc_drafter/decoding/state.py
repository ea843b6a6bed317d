"""One request's decode state: the token sequence and the base's hidden states, read by cursor.

The loop appends each step's emitted tokens with the base's last hidden states at the positions
that produced them; proposers read what they have not seen yet from their own cursor, so one that
skipped steps (plain steps, a union's cheap mode) catches up on its next read, with no copies of the
sequence to keep in step.

    tokens  [t0 ... t(N-1)]     prompt + emitted; tokens[-1] is the root (not yet in the base's cache)
    hidden  [h0 ... h(N-2)]     h_i: the base's last hidden state at position i, whose next token is t(i+1)
"""

from __future__ import annotations

import torch


class DecodeState:
    """Prompt + emitted tokens and the base's hidden states at accepted positions, with a read cursor per
    reader (any object: a proposer passes itself). Proposers read it; only the loop appends."""

    def __init__(self, prompt: list[int], first_token: int, prompt_hidden: torch.Tensor | None = None):
        self.tokens: list[int] = [int(t) for t in prompt] + [int(first_token)]  # read-only for proposers
        self.prompt_len = len(prompt)
        self._chunks: list[tuple[int, torch.Tensor]] = []  # (first position, hidden [1,m,d]) in order
        self.hidden_len = 0  # positions with a hidden state: len(tokens) - 1 once the prompt's are in
        if prompt_hidden is not None:
            self._add_hidden(prompt_hidden)
        self._token_cursor: dict[int, int] = {}
        self._hidden_cursor: dict[int, int] = {}

    @property
    def root(self) -> int:
        """The base's newest token: every proposed tree is rooted at it."""
        return self.tokens[-1]

    @property
    def new_tokens(self) -> list[int]:
        """The tokens emitted after the prompt (a copy)."""
        return self.tokens[self.prompt_len:]

    @property
    def num_new(self) -> int:
        return len(self.tokens) - self.prompt_len

    def append(self, tokens: list[int], hidden: torch.Tensor | None) -> None:
        """The loop's step: the emitted tokens, and hidden [1,m,d] at the positions that produced them
        (the old root and the accepted draft tokens, m = len(tokens))."""
        if hidden is not None and hidden.shape[1] != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but hidden states at {hidden.shape[1]} positions")
        self.tokens.extend(tokens)
        if hidden is not None:
            self._add_hidden(hidden)

    def _add_hidden(self, hidden: torch.Tensor) -> None:
        self._chunks.append((self.hidden_len, hidden))
        self.hidden_len += hidden.shape[1]

    def hidden(self, start: int, end: int | None = None) -> torch.Tensor:
        """The base's hidden states at positions [start, end) -> [1, end-start, d] (a view when one step holds them)."""
        end = self.hidden_len if end is None else end
        parts = []
        for first, h in reversed(self._chunks):
            if first >= end:
                continue
            lo, hi = max(start - first, 0), min(end - first, h.shape[1])
            parts.append(h[:, lo:hi])
            if first <= start:
                break
        parts.reverse()
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def read_tokens(self, reader) -> list[int]:
        """The tokens `reader` has not read yet (the root included), in order; moves its cursor to the end."""
        start = self._token_cursor.get(id(reader), 0)
        self._token_cursor[id(reader)] = len(self.tokens)
        return self.tokens[start:]

    def read_hidden(self, reader) -> tuple[torch.Tensor | None, list[int]]:
        """The hidden states `reader` has not read yet [1,m,d] and the token after each of those positions
        (m ids); (None, []) when there are none. Moves its cursor to the end."""
        start = self._hidden_cursor.get(id(reader), 0)
        end = self.hidden_len
        self._hidden_cursor[id(reader)] = end
        if end <= start:
            return None, []
        return self.hidden(start, end), self.tokens[start + 1: end + 1]
