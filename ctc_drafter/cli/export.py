"""`ctc-drafter export`: a trained draft as a checkpoint another engine loads (draft/export.py)."""

from __future__ import annotations

from ..draft.export import FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a draft as an EAGLE checkpoint for vLLM / SGLang",
                       description="Write DRAFT as the checkpoint another engine loads unchanged. --format eagle: "
                                   "vLLM's EAGLE-1 (EagleLlamaForCausalLM), exact for drafts of the eagle1 layout "
                                   "(train --preset reference); --format eagle3: EAGLE-3 (LlamaForCausalLMEagle3, "
                                   "with d2t/t2d), exact for drafts of the eagle3 layout (train --layout eagle3); "
                                   "other layouts are refused with the reason.")
    p.add_argument("draft", metavar="DRAFT", help="a draft folder written by `ctc-drafter train`")
    p.add_argument("out", metavar="OUT", help="the folder to write (config.json, model.safetensors)")
    p.add_argument("--format", required=True, choices=FORMATS, help="eagle: EAGLE-1; eagle3: EAGLE-3")
    p.add_argument("--base-model", default="default",
                   help="the draft's base (local HF folder, .gguf, or 'default'): its rope settings and context "
                        "length go into the checkpoint's config (eagle3: and its LM head's draft-vocabulary rows)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing OUT")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..draft.export import export_draft

    out = export_draft(args.draft, args.out, args.format, lambda: _base_config(args), overwrite=args.overwrite,
                       base_head_of=lambda: _base_head(args))
    print(f"wrote {out} ({args.format}): serve with vLLM's speculative_config "
          f'{{"method": "{args.format}", "model": "{out}", "num_speculative_tokens": 4}}')
    return 0


def _base_config(args):
    """The base's transformers config alone (no weights loaded)."""
    from transformers import AutoConfig

    from ..errors import CTCDrafterError
    from ..models.base import locate_model, quiet_transformers

    quiet_transformers()
    path, gguf_name, _ = locate_model(args.base_model)
    try:
        return AutoConfig.from_pretrained(path, **({"gguf_file": gguf_name} if gguf_name else {}))
    except (OSError, ValueError) as e:
        raise CTCDrafterError(f"cannot read the config of base {args.base_model}: {str(e).splitlines()[0]}") from e


def _base_head(args):
    """The base's LM head weight [V,d] in float32 (eagle3 writes its draft-vocabulary rows); no tokenizer needed."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..errors import CTCDrafterError
    from ..models.base import locate_model, quiet_transformers

    quiet_transformers()
    path, gguf_name, _ = locate_model(args.base_model)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  **({"gguf_file": gguf_name} if gguf_name else {}))
    except (OSError, ValueError) as e:
        raise CTCDrafterError(f"cannot load base {args.base_model}: {str(e).splitlines()[0]}") from e
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise CTCDrafterError("the base's LM head has a bias, which EAGLE-3's lm_head lacks: not exact")
    return head.weight.detach()
