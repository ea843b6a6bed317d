"""`ctc-drafter corpus`: keep the base-written conversations in the repository, and remake the
training set from them on a fresh machine.

    corpus add DISTILL_DIR --corpus corpus/      a finished `distill` folder's new conversations -> a chunk
    corpus build --corpus corpus/ --out DIR      chunks -> shards for `train --data DIR` (teacher-forced labels)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import CTCDrafterError
from . import checks


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="keep base-written conversations as committed chunks; rebuild training data",
                       description="The corpus folder keeps the conversations the base wrote (token ids, "
                                   "compressed, one chunk per `corpus add`), so that `corpus build` remakes the "
                                   "training set on any machine.")
    cmds = p.add_subparsers(dest="corpus_command", required=True, parser_class=type(p))

    a = cmds.add_parser("add", help="export a finished distill folder's conversations as a new chunk",
                        description="Write the conversations of a finished `ctc-drafter distill` folder (mode "
                                    "regenerate) that the corpus does not hold yet as its next chunk: token ids "
                                    "and trainable runs, LZMA-compressed, with a manifest. The folder is only read.")
    a.add_argument("distill_dir", metavar="DISTILL_DIR", help="a finished `ctc-drafter distill --out` folder")
    a.add_argument("--corpus", default="corpus", help="the corpus folder (default: corpus)")
    a.add_argument("--base-model", default="default",
                   help="the base that wrote the folder (its weights fingerprint goes into the chunk)")
    a.add_argument("--benchmark", action="append", default=[], metavar="FILE",
                   help="a benchmark question file (MT-bench question.jsonl, GSM8K test.jsonl; repeatable): a "
                        "folder whose conversations contain one of its questions is refused")
    a.add_argument("--budget-mb", type=checks.finite_float(0.0), default=None,
                   help="refuse a chunk that takes the corpus over this many MB (default 50: a lean repository)")
    a.add_argument("--trust-remote-code", action="store_true", help="allow a base folder's own tokenizer code")
    a.add_argument("--json", action="store_true", help="print the new chunk's manifest as JSON")
    a.set_defaults(func=run_add)

    b = cmds.add_parser("build", help="rebuild the training set from the corpus (labels by teacher forcing)",
                        description="Label every conversation of the corpus with the base (its greedy next token "
                                    "at every position, optionally its hidden states) into the shard folder "
                                    "`train --data` reads. Rerunning the same command resumes.")
    b.add_argument("--corpus", default="corpus", help="the corpus folder (default: corpus)")
    b.add_argument("--out", required=True, help="the training-data folder to write (new, empty, or an earlier build)")
    b.add_argument("--base-model", default="default", help="must be the base that wrote the corpus (same weights)")
    b.add_argument("--device", default="auto", type=checks.device, help="auto, cpu, cuda, cuda:N, mps")
    b.add_argument("--dtype", default="auto",
                   help="the labelling base's dtype: auto (bf16/fp16 on GPU; on CPU bf16 with AMX, else fp32), "
                        "float32, float16, bfloat16")
    b.add_argument("--save-hidden", action="store_true", help="also store the base's last hidden states (fp16)")
    b.add_argument("--batch-size", type=checks.int_in(1, 1024), default=16, help="conversations per base pass")
    b.add_argument("--shard-size", type=checks.int_in(1, 1 << 20), default=64, help="conversations per shard")
    b.add_argument("--limit", type=checks.int_in(1), default=None,
                   help="label only the first N conversations (a quick check; a larger N later extends --out)")
    b.add_argument("--workers", type=checks.int_in(1, 256), default=1, metavar="N",
                   help="N processes on --device, each loading the base and labelling its share of the shards "
                        "(the cores are split between them; default 1)")
    b.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    b.add_argument("--trust-remote-code", action="store_true", help="allow a base folder that ships its own code")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=run_build)


def run_add(args) -> int:
    from ..data.corpus import add_chunk, corpus_summary, read_corpus

    from ..data.corpus import BUDGET_MB

    m, tally = add_chunk(Path(args.distill_dir), Path(args.corpus), args.base_model, [Path(f) for f in args.benchmark],
                         BUDGET_MB if args.budget_mb is None else args.budget_mb)
    if args.json:
        print(json.dumps(m))
        return 0
    dup = f"{tally['duplicates']} of {tally['conversations']} already in the corpus"
    if m is None:
        print(f"{args.corpus}: nothing added ({dup})", file=sys.stderr)
        return 0
    c = m["counts"]
    total = corpus_summary(read_corpus(Path(args.corpus)))
    print(f"{Path(args.corpus) / m['file']}: {c['conversations']} conversations, {c['tokens']} tokens, "
          f"{c['trainable_positions']} trainable positions, {c['bytes']} bytes "
          f"({c['bytes_per_million_trainable_positions'] / 1e6:.2f} MB per million trainable positions); {dup}")
    print(f"corpus: {total['chunks']} chunks, {total['conversations']} conversations, "
          f"{total['trainable_positions']} trainable positions, {total['bytes'] / 1e6:.2f} MB", file=sys.stderr)
    return 0


def run_build(args) -> int:
    import time

    from ..data.corpus import describe_weights
    from ..data.corpus_build import build, build_options, build_with_workers, check_out_dir, read_checked_corpus
    from ..data.worker_pool import BaseSpec
    from ..models.base import load_base_model

    t0 = time.time()
    check_out_dir(Path(args.out))  # before the slow steps: a wrong --out is refused at once
    chunks = read_checked_corpus(Path(args.corpus), describe_weights(args.base_model), args.base_model)
    opts = build_options(chunks, args.save_hidden, args.shard_size, args.batch_size, args.limit)
    if args.workers > 1:
        if args.trust_remote_code:
            raise CTCDrafterError("--workers loads the base in each worker without remote code; "
                                  "leave out --trust-remote-code or use one worker")
        spec = BaseSpec(args.base_model, device=args.device, dtype=args.dtype)
        m = build_with_workers(spec, chunks, Path(args.out), opts, args.workers, overwrite=args.overwrite,
                               progress=not args.json)
    else:
        base = load_base_model(args.base_model, device=args.device, dtype=args.dtype,
                               trust_remote_code=args.trust_remote_code)
        m = build(base, chunks, Path(args.out), opts, overwrite=args.overwrite, progress=not args.json)
    st = m["stats"]
    summary = {"out": args.out, "shards": len(m["shards"]), "sequences": st["sequences"], "tokens": st["tokens"],
               "trainable_positions": st["assistant_tokens"], "agreement": st["agreement"], "dtype": m["dtype"],
               "hidden": m["hidden"], "seconds": round(time.time() - t0, 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        agree = "n/a" if st["agreement"] is None else f"{100 * st['agreement']:.1f}%"
        print(f"{args.out}: {st['sequences']} sequences, {st['tokens']} tokens ({st['assistant_tokens']} trainable) "
              f"in {len(m['shards'])} shards; base {m['base']['base_model']} ({m['dtype']}); the corpus's tokens "
              f"matching this base's greedy choice: {agree}; {summary['seconds']} s")
    return 0
