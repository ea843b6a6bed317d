"""Options shared by several subcommands."""

from __future__ import annotations

import argparse

from ..decoding.proposers import DEFAULT_PROPOSER, PROPOSERS, proposer_kind
from ..models.compiled_base import BACKENDS
from ..models.templates import TEMPLATES
from ..validate import accepted_by
from . import checks

CTC_TRANSFORM = {"auto": None, "on": True, "off": False}  # --ctc-transform -> SpeculativeDecoder's ctc_transform


# --proposer: a registered name, or a plugin package.module:Class (imported now, so that a typo fails first)
proposer_name = accepted_by(proposer_kind)


def add_model_args(p, draft: bool = True) -> None:
    p.add_argument("--base-model", default="default",
                   help="local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    if draft:
        p.add_argument("--draft-model", default="default",
                       help="draft folder (from `train`), 'default' (shipped for the default base), or 'untrained' / "
                            "'untrained-ar' (a random NAR / AR draft for any base)")
    p.add_argument("--device", default="auto", type=checks.device, help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16/fp16 on GPU; on CPU bf16 with AMX/AVX512-BF16, else fp32), float32, float16, "
                        "bfloat16")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="chat format: the tokenizer's template (auto) or built-in vicuna / llama2chat")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a base folder that ships its own Python code (auto_map) to run it")


def add_decoding_args(p) -> None:
    p.add_argument("--max-new-tokens", type=checks.int_in(1), default=256,
                   help="at most the base's context length")
    p.add_argument("--temperature", type=checks.temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=checks.finite_float(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--top-k", type=checks.int_in(0), default=0)
    p.add_argument("--seed", type=checks.int_in(0, checks.MAX_SEED), default=None)
    p.add_argument("--proposer", default=DEFAULT_PROPOSER, type=proposer_name,
                   help=f"who proposes draft tokens ({', '.join(PROPOSERS)}, or package.module:Class): both the CTC "
                        "draft and n-gram lookup, merged by calibrated acceptance, each step's tree sized by this "
                        "machine's measured pass cost (hybrid, the default); the CTC draft alone; n-gram lookup alone "
                        "in the prompt, the output and earlier requests (no draft needed); or your own Proposer "
                        "subclass, importable from PYTHONPATH")
    p.add_argument("--generator", "--tree-choices", dest="generator", default=None,
                   choices=["beam", "medusa", "prefix"],
                   help="the CTC draft's tree policy: the most likely prefixes by exact CTC prefix probability (default "
                        "on CPU), the paper's Medusa-63 tree (default on CUDA), or CTC prefix beam search")
    p.add_argument("--ctc-transform", default="auto", choices=list(CTC_TRANSFORM),
                   help="read the draft's tree paths with the CTC rule (merge repeats, drop blanks: on), literally "
                        "(no merging, the blank never proposed: off), or as the draft was trained (auto)")
    p.add_argument("--budget", type=checks.int_in(1, checks.MAX_BUDGET), default=None,
                   help=f"tree node budget incl. root, 1..{checks.MAX_BUDGET} (default: 4 on CPU, 64 on CUDA; 64 for medusa)")
    p.add_argument("--always-speculate", action="store_true",
                   help="ask the whole proposer on every step; by default a greedy request takes each step the way "
                        "measured fastest on it: with or without the draft, or a plain 1-token step (the same tokens "
                        "either way)")
    p.add_argument("--cpu-kernels", default="auto", choices=["auto", "packed", "stock"],
                   help="linear layers of our loop on a CPU fp32/bf16 base: auto (the fastest per pass size, timed "
                        "once per machine and cached), oneDNN with packed weights, or PyTorch's stock ones (what HF "
                        "generate uses)")
    p.add_argument("--backend", default="torch", choices=list(BACKENDS),
                   help="how our loop runs the base on a CPU: the HF model (torch), or a compiled static engine with "
                        "int4 / int8 / bf16 weights (compiled-int4: about llama.cpp's speed; lossless with respect to "
                        "that engine's own greedy, not HF's; each load compiles its pass sizes: ~20 s the first time, "
                        "seconds after)")
    p.add_argument("--threads", type=checks.threads, default="auto",
                   help="torch threads on a CPU: auto (1 or all cores, whichever the kernel timing found faster; "
                        "OMP_NUM_THREADS fixes it) or a number")


def load_drafter(args, draft_model):
    """SpeculativeDecoder.from_pretrained from the parsed options; -> (drafter, its KernelReport: the CPU kernel
    choice)."""
    from ..decoding import SpeculativeDecoder

    d = SpeculativeDecoder.from_pretrained(args.base_model, draft_model, device=args.device, dtype=args.dtype,
                                           tree_policy=args.generator, budget=args.budget,
                                           cpu_kernels=args.cpu_kernels, proposer=args.proposer,
                                           trust_remote_code=args.trust_remote_code, cpu_threads=args.threads,
                                           adaptive=not args.always_speculate,
                                           ctc_transform=CTC_TRANSFORM[args.ctc_transform],
                                           backend=getattr(args, "backend", "torch"))
    return d, d.kernel_report
