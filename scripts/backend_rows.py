"""Does a compiled backend's tree pass round each row as the 1-token step does? (issue 33, `--backend`)

    python scripts/backend_rows.py [--base-model default] [--backend compiled-int4] [--past 300] [--sizes 1,2,4,8,16]

For each attention the static engine can run, a chain of N new tokens after a --past-token random context is
passed at once, and row 0's (and row 1's) logits are compared with the same row computed in a pass of 1 (and 2)
rows: `sdpa` (one scaled_dot_product_attention call over the masked cache, what gpt-fast runs) and `rows`
(static_llama.row_attention, what the backend runs). A lossless tree needs 0.0 everywhere: any difference
can flip a near-tie, and then speculative output leaves the engine's own greedy. Prints one line per N.
"""

from __future__ import annotations

import argparse

import torch


def logits_by_size(base, past_ids, new_ids, sizes, attention: str) -> dict[int, torch.Tensor]:
    """N -> logits [N,V] of a chain pass of new_ids[:N] after past_ids (fp32), through the compiled engine."""
    from ctc_drafter.models.compiled_base import attention_length, bucket, row_layout

    eng, past, out = base.engine, past_ids.shape[1], {}
    rows = torch.arange(past)
    eng.run(past_ids, rows, rows, None, head_rows=1, eager=True)  # the context's rows
    for n in sizes:
        B = bucket(n)
        ids = torch.cat([new_ids[:, :n], new_ids.new_zeros(1, B - n)], 1)
        pos = torch.arange(past, past + B)
        seen = torch.ones(n, n, dtype=torch.bool).tril()
        if attention == "rows":
            perm, valid = row_layout(seen, past, B, attention_length(past + B, eng.max_len))
            _, logits = eng.run(ids, pos, pos, valid, perm=perm, eager=base.eager)
        else:
            mask = torch.zeros(B, eng.max_len, dtype=torch.bool)
            mask[:, :past] = True
            mask[:, past: past + B] = torch.ones(B, B, dtype=torch.bool).tril()
            _, logits = eng.run(ids, pos, pos, mask[None, None], eager=base.eager)
        out[n] = logits[0, :n].float()
    return out


def main(argv=None) -> None:
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.compiled_base import COMPILED, MAX_PASS, compile_base

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--backend", default="compiled-int4", choices=list(COMPILED))
    ap.add_argument("--past", type=int, default=300)
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eager", action="store_true", help="the static layers without torch.compile (tests)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = sorted({1, 2, *(int(s) for s in a.sizes.split(","))})
    base = compile_base(load_base_model(a.base_model, device="cpu", dtype=torch.float32), a.backend,
                        context=max(a.past + 2 * max(sizes), 2 * MAX_PASS), eager=a.eager)
    vocab = int(base.config.vocab_size)
    g = torch.Generator().manual_seed(a.seed)
    past_ids = torch.randint(0, vocab, (1, a.past), generator=g)
    new_ids = torch.randint(0, vocab, (1, max(sizes)), generator=g)
    print(f"{a.backend}, {a.past}-token context, {a.threads} thread(s); max |logit difference| against the same row "
          "in a pass of 1 row (row 0) and of 2 rows (row 1)")
    for attention in ("sdpa", "rows"):
        got = logits_by_size(base, past_ids, new_ids, sizes, attention)
        for n in sizes[1:]:
            d0 = (got[n][0] - got[1][0]).abs().max().item()
            d1 = (got[n][1] - got[2][1]).abs().max().item()
            print(f"  {attention:4s} pass of {n:2d} rows: row 0 {d0:.4g}, row 1 {d1:.4g}")


if __name__ == "__main__":
    main()
