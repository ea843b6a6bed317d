"""Many replies at once: the batched decoding loop that distillation and prompt-making run on.

    prompts --one pass each, unpadded------> KV cache, last logits (+ greedy targets / hidden states of
                                             every prompt position, when asked)
            --KV rows right-aligned--------> one batch cache, written in place (its storage doubles when full)
            --one [b,1] pass per token-----> next tokens; rows that end leave the batch at once

Why not HF `generate`: it prefills a padded batch (a 40-token prompt next to a 300-token one costs a
300-token pass), grows its KV cache by concatenation (a copy of the whole cache every step), keeps
finished rows computing until the longest reply ends, and runs logits processors every step. Here
each prompt is prefilled alone, exactly as unbatched greedy decoding does, the cache is written in
place, and per step there is a fixed number of tensor operations whatever the batch size.

Position ids count real tokens only, so a row computes what it would alone, up to float rounding
(the padded keys are masked out): in float64 batched and one-by-one greedy agree token for token
(tests); in float32 a near-tie can flip (scripts/batch_agreement.py measures how often).

With `labels=True` every reply also carries the base's greedy next token (and optionally its last
hidden state) at every position of prompt + reply, read off the same passes: distillation needs no
second pass over what it generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..models.base import cache_kwarg
from ..models.kv_cache import GrowingLayer

LOGIT_ELEMS = 1 << 26  # LM-head rows per chunk * vocab: bounds a [rows, V] logits block (256 MB fp32)


@dataclass
class Sampling:
    """How the next token is chosen: greedy (temperature 0) or temperature / top-p sampling.

    Sampling draws each row's noise from that row's own generator, so a reply depends on its seed,
    not on which other rows share its batch (up to float rounding).
    """

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Reply:
    tokens: list[int]  # the reply, up to and including its end token
    ended: bool  # ended by an end token (not cut by its budget)
    targets: torch.Tensor | None = None  # [P+n] the greedy next token at every position of prompt + reply
    hidden: torch.Tensor | None = None  # [P+n, d] fp16 last hidden states there


def argmax_in_chunks(head, h: torch.Tensor, elems: int = LOGIT_ELEMS) -> torch.Tensor:
    """[T,d] hidden states -> [T] greedy tokens (CPU), the LM head over row chunks (never all [T,V] at once)."""
    rows = max(1, elems // int(head.out_features))
    return torch.cat([head(h[i : i + rows]).argmax(-1) for i in range(0, len(h), rows)]).cpu()


def _top_p_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B,V] logits -> [B,V] probabilities at `temperature`, restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # the most probable token always stays
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def choose_next(logits: torch.Tensor, sampling: Sampling, generators: list[torch.Generator] | None) -> torch.Tensor:
    """[B,V] last-position logits (any device) -> [B] next tokens (CPU).

    Sampling uses the exponential race (argmax p / E, E ~ Exp(1)), which draws token i with
    probability p_i and lets each row take its noise from its own (CPU) generator.
    """
    if sampling.greedy:
        return logits.argmax(-1).cpu()
    probs = _top_p_probs(logits.cpu(), sampling.temperature, sampling.top_p)
    noise = torch.empty_like(probs)
    for b, g in enumerate(generators):  # one call per row and step: the price of per-row seeds
        noise[b].exponential_(generator=g)
    return (probs / noise).argmax(-1)


# --------------------------------------------------------------------------- the batch's KV cache


def batch_cache(base, caches: list, width: int):
    """One cache for the batch: row b holds caches[b] (one prompt's) right-aligned at `width`; its full-
    attention layers are GrowingLayers (a new token is written in place, not appended with torch.cat)."""
    from transformers import DynamicCache

    batch = DynamicCache(config=base.config)
    for i, layer in enumerate(batch.layers):
        parts = [(c.layers[i].keys[0], c.layers[i].values[0]) for c in caches]  # [H,P_b,hd] each
        h, _, hd = parts[0][0].shape
        full = type(layer) is DynamicLayer  # a plain full-attention layer: write it in place
        k = parts[0][0].new_zeros(len(caches), h, width, hd)
        v = torch.zeros_like(k)
        for b, (kb, vb) in enumerate(parts):
            k[b, :, width - kb.shape[1] : width] = kb
            v[b, :, width - vb.shape[1] : width] = vb
        if full:
            batch.layers[i] = layer = GrowingLayer()
        layer.update(k, v)  # another kind of layer (e.g. sliding window) keeps its own bookkeeping
    return batch


def _select_rows(cache, indices: torch.Tensor, start: int) -> None:
    for layer in cache.layers:
        indices = indices.to(layer.keys.device)
        if isinstance(layer, GrowingLayer):
            layer.batch_select_indices(indices, start)
        else:
            layer.batch_select_indices(indices)
            if start:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


# --------------------------------------------------------------------------- passes


def _backbone_pass(base, input_ids, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Last hidden states [B,T,d] of one backbone pass that extends `cache`."""
    backbone = base.model.base_model
    dev = base.device
    out = backbone(input_ids=input_ids.to(dev), attention_mask=None if attention_mask is None else attention_mask.to(dev),
                   position_ids=None if position_ids is None else position_ids.to(dev),
                   **{cache_kwarg(backbone): cache}, use_cache=True)
    return out.last_hidden_state


@dataclass
class _Prefilled:
    cache: object  # the prompt's own DynamicCache
    logits: torch.Tensor  # [V] at the last position
    targets: torch.Tensor | None  # [P]
    hidden: torch.Tensor | None  # [P,d] fp16


def prefill(base, prompt: list[int], labels: bool, keep_hidden: bool) -> _Prefilled:
    """One prompt alone, unpadded: what unbatched decoding computes first."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    h = _backbone_pass(base, torch.tensor([prompt]), cache)[0]  # [P,d]
    head = base.model.get_output_embeddings()
    logits = head(h[-1:])[0]
    targets = argmax_in_chunks(head, h) if labels else None
    hidden = h.to(torch.float16).cpu() if keep_hidden else None
    return _Prefilled(cache, logits, targets, hidden)


class _Batch:
    """The rows still decoding: cache, attention mask [b,T], next positions [b,1], row numbers [b], generators."""

    def __init__(self, cache, att: torch.Tensor, pos: torch.Tensor, generators):
        self.cache, self.att, self.pos, self.gens = cache, att, pos, generators
        self.rows = torch.arange(len(att))

    def keep(self, live: torch.Tensor) -> None:
        """Keep rows where `live` [b] is True; drop leading columns no remaining row attends to."""
        idx = live.nonzero().squeeze(1)
        att = self.att[idx]
        start = int(att.any(0).int().argmax())  # first column some remaining row attends to
        _select_rows(self.cache, idx, start)
        self.att, self.rows, self.pos = att[:, start:], self.rows[idx], self.pos[idx]
        if self.gens is not None:
            self.gens = [self.gens[i] for i in idx.tolist()]

    def step(self, base, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row [b]: (logits [b,V], hidden [b,d]) at its position, on the model's device."""
        pos = self.pos
        self.att = torch.cat([self.att, self.att.new_ones(len(self.rows), 1)], dim=1)
        self.pos = pos + 1
        h = _backbone_pass(base, tokens[:, None], self.cache, self.att, pos)[:, -1]  # [b,d]
        return base.model.get_output_embeddings()(h), h


@torch.no_grad()
def generate_batch(base, prompts: list[list[int]], budgets: list[int], pad_id: int, eos_ids: set[int],
                   sampling: Sampling | None = None, generators: list[torch.Generator] | None = None,
                   labels: bool = False, keep_hidden: bool = False) -> list[Reply]:
    """Replies to a batch of prompts. `budgets[b]` caps reply b; `generators` (one per prompt) are
    needed only for sampling; `labels` / `keep_hidden` add targets / hidden states (see Reply)."""
    sampling = sampling or Sampling()
    if not sampling.greedy and (generators is None or len(generators) != len(prompts)):
        raise ValueError("sampling needs one torch.Generator per prompt")
    n, longest = len(prompts), max(budgets)
    width = max(len(p) for p in prompts)
    pre = [prefill(base, p, labels, keep_hidden) for p in prompts]
    att = torch.zeros(n, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        att[b, width - len(p):] = 1
    batch = _Batch(batch_cache(base, [x.cache for x in pre], width), att,
                   torch.tensor([[len(p)] for p in prompts]), list(generators) if generators is not None else None)
    for x in pre:  # their rows now live in the batch cache
        x.cache = None
    logits = torch.stack([x.logits for x in pre])  # [B,V]
    out = torch.full((n, longest), pad_id, dtype=torch.long)  # [B, longest] the replies
    tgt = torch.full((n, longest), pad_id, dtype=torch.long) if labels else None
    hid = torch.zeros(n, longest, base.config.hidden_size, dtype=torch.float16) if keep_hidden else None
    lengths, ended = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    budget, eos = torch.tensor(budgets), torch.tensor(sorted(eos_ids), dtype=torch.long)
    for step in range(longest):
        nxt = choose_next(logits, sampling, batch.gens)  # [b]
        out[batch.rows, step] = nxt
        lengths[batch.rows] = step + 1
        is_end = torch.isin(nxt, eos)
        ended[batch.rows] = is_end
        live = ~is_end & (budget[batch.rows] > step + 1)
        if not labels:  # a finished row needs no more passes
            if not bool(live.any()):
                break
            if not bool(live.all()):
                batch.keep(live)
                nxt = nxt[live]
        logits, h = batch.step(base, nxt)
        if labels:  # the pass over a row's last token gives its last target, then the row goes
            tgt[batch.rows, step] = logits.argmax(-1).cpu()
            if hid is not None:
                hid[batch.rows, step] = h.to(torch.float16).cpu()
            if not bool(live.any()):
                break
            if not bool(live.all()):
                batch.keep(live)
                logits = logits[live.to(logits.device)]
    return [_reply(out, tgt, hid, pre[b], b, int(lengths[b]), bool(ended[b])) for b in range(n)]


def _reply(out, tgt, hid, pre: _Prefilled, b: int, n: int, ended: bool) -> Reply:
    targets = None if tgt is None else torch.cat([pre.targets, tgt[b, :n]])
    hidden = None if hid is None else torch.cat([pre.hidden, hid[b, :n]])
    return Reply(out[b, :n].tolist(), ended, targets, hidden)
