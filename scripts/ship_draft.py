"""Copy a trained draft into the package as the default draft (bf16 weights: half the size, <= 20 MB).

    python scripts/ship_draft.py CKPT   # e.g. the --out folder of `ctc-drafter train`

`--draft-model default` and `ctc-drafter demo` then use it for the embedded default base.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

from ctc_drafter.draft import SHIPPED_DRAFT, load_draft_folder


def main():
    src = Path(sys.argv[1])
    draft = load_draft_folder(src)
    if SHIPPED_DRAFT.exists():
        shutil.rmtree(SHIPPED_DRAFT)
    draft.save_pretrained(SHIPPED_DRAFT, dtype=torch.bfloat16)
    for extra in ("train_args.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, SHIPPED_DRAFT / extra)
    size = (SHIPPED_DRAFT / "model.safetensors").stat().st_size / 2**20
    print(json.dumps({"shipped": str(SHIPPED_DRAFT), "from": str(src), "mib": round(size, 2)}))
    if size > 20:
        sys.exit("the shipped draft must stay <= 20 MB")


if __name__ == "__main__":
    main()
