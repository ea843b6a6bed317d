"""The frozen base's passes during distillation: greedy labels of finished sequences (one batched
pass) and the base's own replies to prompts (batched generation), plus how prompts are batched
and how a sampled reply is seeded."""

from __future__ import annotations

import torch

from ..errors import CTCDrafterError
from .batch_generation import LOGIT_ELEMS, Reply, Sampling, argmax_in_chunks, generate_batch

KV_TOKENS = 1 << 15  # rows x (prompt + reply) of one generation batch: bounds its KV cache (~1.5 GB for SmolLM2-135M)


def pad_id(base) -> int:
    tok = base.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return min(base.eos_token_ids, default=0)


@torch.no_grad()
def label_batch(base, seqs: list[list[int]], save_hidden: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One base pass over right-padded sequences: per sequence (greedy next tokens [T], hidden [T,d] fp16 or None).

    Right padding keeps every real token at its own position and, the attention being causal,
    out of reach of the pads; the LM head runs in row chunks so a long batch never holds [B,T,V].
    """
    dev = base.device
    lens = [len(s) for s in seqs]
    ids = torch.full((len(seqs), max(lens)), pad_id(base), dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
    hidden = base.model.base_model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).last_hidden_state
    head = base.model.get_output_embeddings()
    out = []
    for b, n in enumerate(lens):
        h = hidden[b, :n]  # [T,d]
        targets = argmax_in_chunks(head, h, LOGIT_ELEMS)
        out.append((targets, h.to(torch.float16).cpu() if save_hidden else None))
    return out


def generate_replies(base, prompts: list[list[int]], budgets: list[int], temperature: float = 0.0,
                     top_p: float = 1.0, seeds: list[int] | None = None, save_hidden: bool = False) -> list[Reply]:
    """The base's replies to a batch of prompts, each with the base's greedy targets over prompt + reply.

    `budgets` caps each reply; sampling (temperature > 0) draws reply b from a generator seeded with seeds[b].
    """
    sampling = Sampling(temperature, top_p)
    gens = None if sampling.greedy else [torch.Generator().manual_seed(s) for s in seeds]
    return generate_batch(base, prompts, budgets, pad_id(base), base.eos_token_ids, sampling, gens,
                          labels=True, keep_hidden=save_hidden)


def reply_batches(todo: list, batch_size: int, max_tokens: int = KV_TOKENS) -> list[list]:
    """Consecutive runs of `todo` (sorted by prompt length; items end with (prompt, budget)) of at most
    batch_size prompts whose cache, rows x (longest prompt + largest budget), stays under max_tokens."""
    batches, cur = [], []
    for item in todo:
        grown = cur + [item]
        width = max(len(x[-2]) for x in grown) + max(x[-1] for x in grown)
        if cur and (len(grown) > batch_size or len(grown) * width > max_tokens):
            batches.append(cur)
            grown = [item]
        cur = grown
    return batches + ([cur] if cur else [])


def reply_seed(seed: int, record: int, turn: int) -> int:
    """The sampling seed of one reply: fixed by --seed, the record's place in the data and the turn. torch's
    CPU generator keeps a seed's low 32 bits only, so --seed is mixed into them (seed 0 gives the stream
    that every --seed gave before, when it sat above bit 40 and was dropped)."""
    return (((record << 12) + turn) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF



def require_tokenizer(base) -> None:
    if base.tokenizer is None:
        raise CTCDrafterError("distill needs a base model with a tokenizer")
