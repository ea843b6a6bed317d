"""`ctc-drafter train`: fit a CTC draft to a frozen base on `distill` output (see training/train.py).

Also runs as `python -m ctc_drafter.train ...` and `accelerate launch [--mixed_precision=bf16] -m ctc_drafter.train ...`.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..training.train import add_train_args

    p = sub.add_parser("train", help="train a CTC draft on distilled data (accelerate launch for several GPUs)",
                       description="Train a CTC draft for a frozen base. CKPT then loads as --draft-model "
                                   "(latest epoch); CKPT/epoch_N holds each epoch, CKPT/state_N resumes "
                                   "with --recover N.")
    add_train_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..training.train import run_training

    return run_training(args)
