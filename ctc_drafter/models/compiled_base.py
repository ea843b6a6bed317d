"""The base on a compiled static engine: our loop over gpt-fast's layout (models/static_llama.py), with
weight-only int4 or int8 linears or plain bf16 (`--backend compiled-int4 | compiled-int8 | compiled-bf16`).

Why: on a CPU the eager HF pass costs several times llama.cpp's; the compiled int4 engine generates about
as fast as llama.cpp does through llama-cpp-python, and its passes grow slowly with the tokens in them
(BENCHMARKS.md, "Our loop on a compiled int4 engine"). Its weights round differently from the HF base's,
so this backend is lossless with respect to itself: speculative output equals this engine's own greedy
(1-token passes), as llama.cpp's speculation is with respect to its Q4 greedy. That needs each tree row to
round exactly as the 1-token step at its position, which CPU flash attention does not do; the passes after
the prefill attend with static_llama.row_attention over a per-row layout (row_layout) instead. The prefill
(eager: one shape per prompt) attends causally over the prompt's rows only and, past DENSE_ROWS tokens,
multiplies the dequantized weights densely (the int4 kernel is built for few rows); the engine's greedy and
its speculation share it.

How a pass maps onto the static cache (one per engine, so one request at a time): a pass of n tokens
runs as a bucket of B >= n rows (the next power of two: one compiled graph per bucket) written at cache
rows past..past+B-1; the padding rows see only the past and are overwritten by the next pass, since
every pass writes from the first row after the kept ones. Compaction copies the accepted nodes' rows
down, as models/kv_cache.py does for the eager cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..errors import CTCDrafterError
from .base import BaseModel
from .kernel_choice import STOCK, KernelReport
from .static_llama import StaticLlama

log = logging.getLogger(__name__)

TORCH = "torch"  # the eager HF model with the kernels chosen per pass size (models/kernel_choice.py)
COMPILED = {"compiled-int4": ("int4", torch.bfloat16), "compiled-int8": ("int8", torch.bfloat16),
            "compiled-bf16": (None, torch.bfloat16)}  # backend -> (weight quantisation, activation dtype)
BACKENDS = (TORCH, *COMPILED)
DEFAULT_CONTEXT = 2048  # static cache rows (prompt + answer); a pass attends over the rows in use
MAX_PASS = 64  # the largest pass after the prefill; rows kept free above the context for it
ROWS_STEP = 64  # a pass attends over the rows in use rounded up to this (the masked rest adds exact zeros)


class StaticKV:
    """The compiled engine's cache: how many of its rows are valid (the rows live in the engine's layers)."""

    def __init__(self, base: "CompiledBase"):
        self.base, self.length = base, 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def compact(self, past_len: int, keep: list[int]) -> None:
        """Keep rows 0..past_len-1 plus tree nodes `keep` (ascending, root first), in path order."""
        self.base.check_owner(self)
        n = len(keep)
        if keep != list(range(n)):
            src = torch.tensor(keep) + past_len
            for layer in self.base.engine.layers:
                layer.k_cache[:, :, past_len: past_len + n] = layer.k_cache.index_select(2, src)
                layer.v_cache[:, :, past_len: past_len + n] = layer.v_cache.index_select(2, src)
        self.length = past_len + n


def bucket(n: int) -> int:
    """The compiled pass size that runs n tokens: the next power of two."""
    return 1 << (n - 1).bit_length()


@dataclass
class CompiledBase(BaseModel):
    """A BaseModel whose passes run on a StaticLlama; the HF model stays for what reads its weights (the
    draft's embedding and head, the tokenizer, the config)."""

    engine: StaticLlama | None = field(default=None, repr=False)
    backend: str = "compiled-int4"
    eager: bool = False  # run the static layers without torch.compile (tests: same kernels, no compile time)

    def __post_init__(self):
        super().__post_init__()
        self.exact_tree = False  # the static engine runs its own rows; models/tree_attention.py is for HF's
        self._owner: StaticKV | None = None

    @property
    def max_length(self) -> int:
        """Prompt plus answer fit the static cache with room for the largest pass above them."""
        return min(super().max_length, self.engine.max_len - MAX_PASS)

    def new_cache(self) -> StaticKV:
        """The cache of a new request; an earlier request's cache on this engine is no longer valid."""
        self._owner = StaticKV(self)
        return self._owner

    def check_owner(self, cache) -> None:
        if cache is not self._owner:
            raise CTCDrafterError(f"the {self.backend} backend runs one request at a time: this cache belongs to an "
                                  "earlier request (make a new one with new_kv_cache)")

    def warm(self, nodes: int) -> float:
        """Compile every pass size that trees of up to `nodes` nodes run (1, 2, 4, ... buckets), checking on
        this CPU that each rounds its rows as 1-token steps do (check_rows); -> seconds taken. Leaves no
        request state behind."""
        t0 = time.perf_counter()
        for b in sorted({bucket(n) for n in range(1, min(nodes, MAX_PASS) + 1)}):
            if b > 1:
                self.check_rows(b)
        self._owner = None
        took = time.perf_counter() - t0
        log.info("%s: compiled and checked the pass sizes up to %d nodes in %.1f s", self.backend, nodes, took)
        return took

    def check_rows(self, rows: int, past: int = 40, seed: int = 0) -> None:
        """A chain of `rows` random tokens in one pass must give each row the logits bit for bit that
        1-token steps give it: what makes speculation lossless on this engine. Kernels and compilers vary
        by CPU, so this is measured where the backend runs; CTCDrafterError if a row rounds apart."""
        g = torch.Generator().manual_seed(seed)
        vocab = int(self.config.vocab_size)
        prompt, chain = torch.randint(0, vocab, (1, past), generator=g), torch.randint(0, vocab, (1, rows), generator=g)
        cache = self.new_cache()
        self.forward(prompt, cache, logits_at=slice(-1, None))
        _, together = self.forward(chain, cache)
        cache = self.new_cache()
        self.forward(prompt, cache, logits_at=slice(-1, None))
        alone = torch.cat([self.forward(chain[:, i: i + 1], cache)[1] for i in range(rows)], 1)
        if not torch.equal(together, alone):
            row = int((together != alone).any(-1)[0].nonzero()[0])
            raise CTCDrafterError(f"on this CPU the {self.backend} backend's {rows}-token pass rounds row {row} apart "
                                  "from its 1-token step, so its speculation would not be lossless; use --backend torch")

    @torch.no_grad()
    def forward(self, input_ids, past_key_values, position_ids=None, attention_mask=None, logits_at=None):
        """BaseModel.forward's contract on the static engine: (last hidden states [1,n,d] in the HF model's
        dtype, logits [1,n',V] fp32); attention_mask None (causal) or the additive tree mask [1,1,n,past+n]."""
        cache = past_key_values
        self.check_owner(cache)
        if self.hidden_layers:
            raise CTCDrafterError(f"the {self.backend} backend returns the last hidden states only; an eagle3 draft "
                                  "reads several layers: use --backend torch")
        if input_ids.shape[0] != 1:
            raise CTCDrafterError(f"the {self.backend} backend decodes one sequence at a time")
        past, n = cache.length, input_ids.shape[1]
        if past == 0:
            hidden, logits = self._prefill(input_ids, logits_at)
        else:
            hidden, logits = self._pass(input_ids, past, position_ids, attention_mask)
            if logits_at is not None:
                logits = logits[:, logits_at]
        cache.length = past + n
        return hidden.to(self.dtype), logits.float()

    def _prefill(self, ids, logits_at):
        """The prompt at rows 0..T-1, causal, eagerly (one shape per prompt: not worth a compile)."""
        T = ids.shape[1]
        if T > self.engine.max_len:
            raise CTCDrafterError(f"the prompt is {T} tokens; the {self.backend} backend holds {self.engine.max_len}")
        rows = torch.arange(T)
        last = isinstance(logits_at, slice) and logits_at == slice(-1, None)
        hidden, logits = self.engine.run(ids, rows, rows, None, head_rows=1 if last else T, eager=True)
        return hidden, logits if last or logits_at is None else logits[:, logits_at]

    def _pass(self, ids, past: int, position_ids, attention_mask):
        """n tokens after `past` rows as one bucket of B rows -> (hidden [1,n,d], logits [1,n,V])."""
        n = ids.shape[1]
        B = bucket(n)
        if n > MAX_PASS or past + B > self.engine.max_len:
            raise CTCDrafterError(f"a pass of {n} tokens after {past} does not fit the {self.backend} backend's "
                                  f"{self.engine.max_len} rows (at most {MAX_PASS} tokens per pass)")
        pos = position_ids[0] if position_ids is not None else torch.arange(past, past + n)
        if attention_mask is None:
            seen = torch.ones(n, n, dtype=torch.bool).tril()
        else:  # additive: 0 where a node sees another
            seen = attention_mask[0, 0, :, past: past + n] == 0
        perm, valid = row_layout(seen, past, B, attention_length(past + B, self.engine.max_len))
        ids = torch.cat([ids, ids.new_zeros(1, B - n)], 1)
        pos = torch.cat([pos, pos[-1:].expand(B - n)])
        hidden, logits = self.engine.run(ids, pos, torch.arange(past, past + B), valid, eager=self.eager, perm=perm)
        return hidden[:, :n], logits[:, :n]


def attention_length(rows_in_use: int, max_len: int) -> int:
    """The positions a pass attends over: the rows in use rounded up to ROWS_STEP (one compiled length per step)."""
    return min(max_len, -(-rows_in_use // ROWS_STEP) * ROWS_STEP)


def row_layout(seen: torch.Tensor, past: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of a pass finds its keys in position order (static_llama.row_attention): seen [n,n]
    (node i sees node j: its ancestors and itself; parents come before children) -> perm [rows,length]
    (position c of row i is cache row perm[i, c]: c itself in the past, then the rows past + j of the nodes
    it sees, in order), valid [rows,length] (c <= the row's position). Rows n..rows-1 pad a bucket: they
    see the past only."""
    n = seen.shape[0]
    perm = torch.arange(length).repeat(rows, 1)
    valid = torch.zeros(rows, length, dtype=torch.bool)
    valid[:, :past] = True
    count = seen.sum(1)                                                  # [n]: depth + 1
    order = torch.where(seen, torch.arange(n), n).sort(1).values        # [n,n]: the nodes seen, ascending
    kept = torch.arange(n)[None] < count[:, None]                        # [n,n]
    tail = perm[:n, past: past + n]
    tail[kept] = past + order[kept]
    valid[:n, past: past + n] = kept
    return perm, valid


def compile_base(base: BaseModel, backend: str, context: int = DEFAULT_CONTEXT, eager: bool = False,
                 dtype: torch.dtype | None = None) -> CompiledBase:
    """`base`'s weights on a static engine of `context` rows for `backend` (COMPILED); dtype overrides the
    activation dtype (tests run float32). The HF model is left as it was (the draft reads its weights)."""
    if backend not in COMPILED:
        raise CTCDrafterError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
    if base.device.type != "cpu":
        raise CTCDrafterError(f"the {backend} backend runs on a CPU; on {base.device.type} use --backend torch")
    if context <= MAX_PASS:
        raise CTCDrafterError(f"the {backend} backend needs a context above {MAX_PASS} rows, got {context}")
    quant, act = COMPILED[backend]
    if quant == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise CTCDrafterError(f"this torch ({torch.__version__}) has no int4 CPU kernel; use compiled-int8")
    engine = StaticLlama(base.model, max_len=min(context, base.max_length) + MAX_PASS, dtype=dtype or act,
                         quant=quant)
    if not eager:
        engine.compile()
    log.info("%s: the base on a static engine of %d rows (%s weights); each pass size compiles on first use",
             backend, engine.max_len, quant or "bf16")
    return CompiledBase(model=base.model, tokenizer=base.tokenizer, name=base.name, cpu=base.cpu, engine=engine,
                        backend=backend, eager=eager)


def static_engine_report(backend: str, threads: int | str = "auto") -> KernelReport:
    """What a compiled backend reports in place of the eager kernel choice: its threads (a number sets
    them; auto leaves torch's count, which OMP_NUM_THREADS fixes), no measured cost model."""
    if threads != "auto":
        torch.set_num_threads(int(threads))
    return KernelReport(STOCK, [(1, backend)], note=f"{backend}: a static compiled engine, not timed per pass size",
                        threads=torch.get_num_threads())
