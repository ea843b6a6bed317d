"""How many tokens each answer turn has: recorded, from stored ids, from a plain loop's steps, or
re-counted with a tokenizer that is first checked against the turns whose counts the files record."""

from __future__ import annotations

from ..errors import CTCDrafterError
from .answer_files import AnswerFile

# A re-count with the files' own tokenizer differs from a recorded count by the end token and
# stripped whitespace: a token or two a turn. Past this, the tokenizer is another model's.
RECOUNT_TOLERANCE = (0.05, 2)  # (share of the recorded tokens, tokens per turn)
CALIBRATION_TURNS = 64


class TokenCounter:
    """Tokens of one turn, by the first rule that applies:

    recorded      the file's own new_tokens
    token ids     the stored ids (exact)
    loop steps    a plain decoding loop (the reference implementation's baseline files, which record
                  new_tokens 0) emits one token per step: idxs + 1 tokens, idxs being its last
                  0-based loop index; exact, and what its speculative files confirm
    re-tokenized  the text, re-counted with --tokenizer (approximate: stripped text, no end token),
                  after checking that tokenizer against the turns whose counts the files record
    """

    def __init__(self, load_tokenizer=None, calibration: list[tuple[str, int]] | None = None, name: str = ""):
        self._load = load_tokenizer
        self._tok = None
        self.calibration = (calibration or [])[:CALIBRATION_TURNS]
        self.name = name
        self.unverified = False  # re-counted with a tokenizer no recorded count could check

    def _tokenizer(self):
        if self._tok is None and self._load is not None:
            self._tok = self._load()
            self._check_tokenizer()
        return self._tok

    def _encode_len(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False))

    def _check_tokenizer(self) -> None:
        """Refuse a tokenizer whose counts of recorded turns are off: it belongs to another model."""
        if not self.calibration:
            self.unverified = True
            return
        recorded = sum(n for _, n in self.calibration)
        recount = sum(self._encode_len(t) for t, _ in self.calibration)
        off = sum(abs(self._encode_len(t) - n) for t, n in self.calibration)
        share, per_turn = RECOUNT_TOLERANCE
        if off > share * recorded + per_turn * len(self.calibration):
            raise CTCDrafterError(
                f"--tokenizer {self.name} does not match the answer files' model: on {len(self.calibration)} turn(s) "
                f"whose token counts the files record ({recorded} tokens) it counts {recount}; a re-count with it "
                "would give wrong speeds. Give the tokenizer of the model that wrote the answers")

    def count(self, choice: dict, j: int, plain_loop: bool = False) -> tuple[int | None, str]:
        n = recorded_count(choice, j)
        if n is not None:
            return n, "recorded" if _recorded(choice, j) else "token ids"
        idxs = choice.get("idxs")
        if plain_loop and isinstance(idxs, list) and j < len(idxs):
            return int(idxs[j]) + 1, "loop steps"
        tok = self._tokenizer()
        if tok is not None:
            return self._encode_len(choice["turns"][j]), "re-tokenized"
        return None, "missing"


def _recorded(choice: dict, j: int) -> bool:
    nt = choice.get("new_tokens")
    return isinstance(nt, list) and j < len(nt) and nt[j] > 0


def recorded_count(choice: dict, j: int) -> int | None:
    """Turn j's tokens as the file records them (new_tokens, else stored ids), or None."""
    if _recorded(choice, j):
        return int(choice["new_tokens"][j])
    ids = choice.get("tokens")
    if isinstance(ids, list) and j < len(ids) and isinstance(ids[j], list) and ids[j]:
        return len(ids[j])
    return None


def calibration_turns(files: list[AnswerFile], keys: list[str]) -> list[tuple[str, int]]:
    """(text, recorded count) of turns whose token count a file records: the yardstick for --tokenizer."""
    out = []
    for f in files:
        for k in keys:
            for c in f.records[k]["choices"]:
                for j, text in enumerate(c["turns"]):
                    n = recorded_count(c, j)
                    if n is not None and text.strip():
                        out.append((text, n))
                        if len(out) >= CALIBRATION_TURNS:
                            return out
    return out
