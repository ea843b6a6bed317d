"""Draft quality from greedy decodes of the frames, accumulated over steps (and processes).

Greedy decode of one position: per-frame argmax, then the CTC collapse (merge repeats, drop blanks);
for a Medusa-style "ce" draft the frames are plain heads: frame j is token j.

    acc[j]          ctc: the decode's first j+1 tokens equal the labels' (prefix match);
                    ce:  frame j's argmax equals label j
                    (over positions whose label window has more than j tokens)
    exact           the decode equals the label window
    est_accept_len  mean of (leading decode tokens equal to the labels) + 1: what one speculative step
                    would accept if the base verified only this greedy path (plus its bonus token)
"""

from __future__ import annotations

import torch

from ..draft.ctc import collapse


def greedy_decodes(logits: torch.Tensor, vocab_size: int, ctc: bool) -> list[list[int]]:
    """logits [N,L,V+1] -> N greedy token sequences."""
    if ctc:
        best = logits.argmax(-1).tolist()  # [N,L], blank = vocab_size
        return [collapse(row, blank=vocab_size) for row in best]
    return logits[..., :vocab_size].argmax(-1).tolist()


def leading_matches(decode: list[int], labels: list[int]) -> int:
    n = 0
    for a, b in zip(decode, labels):
        if a != b:
            break
        n += 1
    return n


class DraftMetrics:
    """Sums over positions; `reduce` adds up several processes' sums, `summary` turns them into rates."""

    def __init__(self, label_len: int):
        self.k = label_len
        self.sums = torch.zeros(4 + 2 * label_len, dtype=torch.float64)  # see _layout
        self.loss_sums: dict[str, float] = {}
        self.loss_weight = 0.0

    # layout of self.sums: [positions, exact, accept, unused, correct_0..k-1, total_0..k-1]

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor, label_len: torch.Tensor, vocab_size: int, ctc: bool):
        """logits [B,P,L,V+1], labels [B,P,k], label_len [B,P] (0 = padding)."""
        valid = label_len > 0
        lg, lab, ln = logits[valid], labels[valid].tolist(), label_len[valid].tolist()
        if not ln:
            return
        k = self.k
        s = torch.zeros_like(self.sums)
        dec = greedy_decodes(lg.float(), vocab_size, ctc)
        if not ctc:
            n_heads = min(lg.shape[1], k)
            frame_hit = (lg[:, :n_heads, :vocab_size].argmax(-1) == labels[valid][:, :n_heads]).tolist()
        for i, (d, y, n) in enumerate(zip(dec, lab, ln)):
            y = y[:n]
            m = leading_matches(d, y)
            s[0] += 1
            s[1] += float((d if ctc else d[:n]) == y)
            s[2] += m + 1
            for j in range(n):
                hit = (m > j) if ctc else (j < len(frame_hit[i]) and frame_hit[i][j])
                s[4 + j] += float(hit)
                s[4 + k + j] += 1
        self.sums += s

    def add_loss(self, parts: dict, weight: float):
        for name, v in parts.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + v * weight
        self.loss_weight += weight

    def reduce(self, accelerator) -> "DraftMetrics":
        """Sum over processes (a collective: every process must call it)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        names = sorted(self.loss_sums)
        flat = torch.cat([self.sums, torch.tensor([self.loss_weight] + [self.loss_sums[n] for n in names],
                                                  dtype=torch.float64)]).to(accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum").cpu()
        out = DraftMetrics(self.k)
        out.sums = flat[: len(self.sums)]
        out.loss_weight = float(flat[len(self.sums)])
        out.loss_sums = {n: float(v) for n, v in zip(names, flat[len(self.sums) + 1:].tolist())}
        return out

    def summary(self) -> dict:
        s, k = self.sums, self.k
        n = float(s[0])
        out = {name: v / self.loss_weight for name, v in self.loss_sums.items()} if self.loss_weight else {}
        if n:
            out["acc"] = [round(float(s[4 + j] / s[4 + k + j]), 4) if s[4 + k + j] else None for j in range(k)]
            out["exact"] = round(float(s[1]) / n, 4)
            out["est_accept_len"] = round(float(s[2]) / n, 4)
            out["positions"] = int(n)
        return out
