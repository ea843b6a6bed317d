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

# layout of a sums vector (int64, 4 + 2k): [positions, exact, accept, unused, correct_0..k-1, total_0..k-1]


def greedy_frames(logits: torch.Tensor, num_tokens: int, ctc: bool) -> torch.Tensor:
    """logits [...,L,N+1] -> [...,L] per-frame argmax (ctc: blank = num_tokens included; ce: tokens only).

    num_tokens: the token symbols a frame scores (DraftConfig.num_tokens; the proposal vocabulary when
    the draft has one), the blank coming after them."""
    return logits.argmax(-1) if ctc else logits[..., :num_tokens].argmax(-1)


def collapse_frames(best: torch.Tensor, blank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """best [N,L] frame symbols -> (decodes [N,L] left-aligned, -1 past each length; lengths [N]).

    The CTC collapse on the device: a frame emits when it is not blank and differs from the frame before.
    """
    N, L = best.shape
    emit = best != blank
    emit[:, 1:] &= best[:, 1:] != best[:, :-1]
    slot = torch.where(emit, emit.long().cumsum(-1) - 1, L)  # where each emitted symbol lands; the rest: column L
    out = torch.full((N, L + 1), -1, dtype=best.dtype, device=best.device)
    out.scatter_(1, slot, best)
    return out[:, :L], emit.sum(-1)


def greedy_decodes(logits: torch.Tensor, num_tokens: int, ctc: bool) -> list[list[int]]:
    """logits [N,L,num_tokens+1] -> N greedy symbol sequences."""
    best = greedy_frames(logits, num_tokens, ctc)
    if not ctc:
        return best.tolist()
    dec, n = collapse_frames(best, num_tokens)
    return [row[:m] for row, m in zip(dec.tolist(), n.tolist())]


def leading_matches(decode: torch.Tensor, decode_len: torch.Tensor, labels: torch.Tensor,
                    window_len: torch.Tensor) -> torch.Tensor:
    """decode [N,L] (lengths [N]), labels [N,k] (lengths window_len [N]) -> [N] leading tokens equal in both."""
    n = min(decode.shape[1], labels.shape[1])
    j = torch.arange(n, device=decode.device)
    same = (decode[:, :n] == labels[:, :n]) & (j < decode_len[:, None]) & (j < window_len[:, None])
    return same.long().cumprod(-1).sum(-1)


@torch.no_grad()
def batch_sums(logits: torch.Tensor, labels: torch.Tensor, window_len: torch.Tensor, num_tokens: int,
               ctc: bool) -> torch.Tensor:
    """logits [B,P,L,N+1], labels [B,P,k], window_len [B,P] (labels per position; 0 = padding) -> sums
    [4+2k] int64, on their device.

    All on the device and without a host sync, so a training step can add it every step and the host
    reads the sums only when it writes a log line.
    """
    return frame_sums(greedy_frames(logits, num_tokens, ctc), labels, window_len, num_tokens, ctc)


@torch.no_grad()
def frame_sums(best: torch.Tensor, labels: torch.Tensor, window_len: torch.Tensor, num_tokens: int,
               ctc: bool) -> torch.Tensor:
    """best [B,P,L] greedy frame symbols (`greedy_frames`), labels [B,P,k], window_len [B,P] -> sums [4+2k]."""
    # padding positions stay in (length 0 counts nothing): a boolean selection would sync with the host
    best = best.flatten(0, 1)  # [N,L], N = B*P
    lab, ln = labels.flatten(0, 1), window_len.flatten().long()  # [N,k], [N]
    valid = ln > 0
    N, L = best.shape
    k = lab.shape[1]
    if ctc:
        dec, dec_len = collapse_frames(best, num_tokens)
    else:  # Medusa-style heads: frame j is token j
        dec, dec_len = best, torch.full((N,), L, dtype=torch.long, device=best.device)
    m = leading_matches(dec, dec_len, lab, ln)  # [N]
    exact = valid & (m == ln) & ((dec_len == ln) if ctc else True)  # ce compares decode[:len] (needs L >= len)
    j = torch.arange(k, device=best.device)
    counted = j < ln[:, None]  # [N,k]: label j exists
    if ctc:  # token j is right when the decode's prefix through j is
        hit = j < m[:, None]
    else:  # frame j's argmax is label j, whatever the frames before it
        hit = torch.zeros_like(counted)
        nh = min(L, k)
        hit[:, :nh] = best[:, :nh] == lab[:, :nh]
    hit &= counted
    head = torch.stack([valid.sum(), exact.sum(), ((m + 1) * valid).sum(), m.new_zeros(())])
    return torch.cat([head, hit.sum(0), counted.sum(0)]).long()


class DraftMetrics:
    """Sums over positions; `reduce` adds up several processes' sums, `summary` turns them into rates.

    The decode sums stay on the device they were computed on until `summary` or `reduce` reads them.
    """

    def __init__(self, k: int):
        self.k = k  # the label window's length (DraftConfig.label_len)
        self.sums = torch.zeros(4 + 2 * k, dtype=torch.long)  # layout: see the top of this file
        self.loss_sums: dict[str, float] = {}
        self.loss_weight = 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, window_len: torch.Tensor, num_tokens: int, ctc: bool):
        """logits [B,P,L,N+1], labels [B,P,k], window_len [B,P] (0 = padding)."""
        self.add_sums(batch_sums(logits, labels, window_len, num_tokens, ctc))

    def add_sums(self, sums: torch.Tensor):
        """Add a `batch_sums` result (no host sync: the running sums move to its device once)."""
        if self.sums.device != sums.device:
            self.sums = self.sums.to(sums.device)
        self.sums += sums

    def add_loss(self, parts: dict, weight: float):
        for name, v in parts.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + v * weight
        self.loss_weight += weight

    def reduce(self, accelerator) -> "DraftMetrics":
        """Sum over processes (a collective: every process must call it)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        names = sorted(self.loss_sums)
        losses = torch.tensor([self.loss_weight] + [self.loss_sums[n] for n in names], dtype=torch.float64)
        flat = torch.cat([self.sums.cpu().double(), losses]).to(accelerator.device)
        flat = accelerator.reduce(flat, reduction="sum").cpu()
        out = DraftMetrics(self.k)
        out.sums = flat[: len(self.sums)]
        out.loss_weight = float(flat[len(self.sums)])
        out.loss_sums = {n: float(v) for n, v in zip(names, flat[len(self.sums) + 1:].tolist())}
        return out

    def summary(self) -> dict:
        s, k = self.sums.cpu().double(), self.k  # the one host read of the decode sums
        n = float(s[0])
        out = {name: v / self.loss_weight for name, v in self.loss_sums.items()} if self.loss_weight else {}
        if n:
            out["acc"] = [round(float(s[4 + j] / s[4 + k + j]), 4) if s[4 + k + j] else None for j in range(k)]
            out["exact"] = round(float(s[1]) / n, 4)
            out["est_accept_len"] = round(float(s[2]) / n, 4)
            out["positions"] = int(n)
        return out
