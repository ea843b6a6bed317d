"""Options shared by several subcommands."""

from __future__ import annotations

from ..models.templates import TEMPLATES


def add_model_args(p, draft: bool = True) -> None:
    p.add_argument("--base-model", default="default",
                   help="local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    if draft:
        p.add_argument("--draft-model", default="default",
                       help="draft folder (from `train`), 'default' (shipped for the default base) or 'untrained'")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), float32, float16, bfloat16")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="chat format: the tokenizer's template (auto) or built-in vicuna / llama2chat")


def add_decoding_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tree-choices", "--generator", dest="generator", default="beam",
                   choices=["beam", "medusa", "prefix"],
                   help="candidate generator: CTC prefix beam search (default), the paper's Medusa-63 tree, or the "
                        "most likely prefixes by exact CTC prefix probability")
    p.add_argument("--budget", type=int, default=None,
                   help="tree node budget incl. root (default: 4 on CPU, 64 on CUDA; 64 for medusa)")
    p.add_argument("--cpu-kernels", default="packed", choices=["packed", "stock"],
                   help="linear layers of our loop on a CPU fp32 base: oneDNN with packed weights (default, "
                        "faster) or PyTorch's stock ones (what HF generate uses)")
