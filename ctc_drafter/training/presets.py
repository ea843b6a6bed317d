"""`train --preset NAME`: a recipe as a set of option defaults; options given explicitly still win, and
train_args.json records the values the run used.

reference: the CTC-drafter reference code (`train/main.py`, `train/train.sh`, `--fixlen 3 --cw 0.01`):
the eagle1 layout (draft/eagle1_model.py) trained on every position (training/reference_losses.py)
with feature 1.0 + soft token CE 0.1 + CTC 0.01 over 6 positions against 3 tokens, uniform input noise
0.2; AdamW (betas 0.9/0.95, torch's default weight decay 0.01) at lr 3e-5, linear warmup over 2000
steps then linear decay to 0 at step 800000 (transformers' get_linear_schedule_with_warmup), each
gradient element clipped to 0.5; batch size 1, 20 epochs, sequences cut at 1600 tokens, 5% held out.
"""

from __future__ import annotations

from dataclasses import fields, replace

from .options import TrainOptions

REFERENCE = {
    "arch": "ar", "layout": "eagle1", "frames": 4, "label_len": 3,
    "feature_weight": 1.0, "token_weight": 0.1, "ctc_weight": 0.01, "input_noise": 0.2,
    "lr": 3e-5, "weight_decay": 0.01, "warmup": 2000, "lr_schedule": "linear", "schedule_steps": 800_000,
    "clip": "value", "grad_clip": 0.5, "epochs": 20, "bs": 1, "max_len": 1600, "eval_frac": 0.05, "seed": 0,
}
PRESETS = {"reference": REFERENCE}


def apply_preset(opts: TrainOptions, given: set[str] | frozenset[str] | None = None) -> TrainOptions:
    """opts with its preset's values for every option not in `given` (the options set explicitly; None:
    those that differ from TrainOptions' defaults, for the Python API)."""
    if not opts.preset:
        return opts
    if given is None:
        default = TrainOptions(data=opts.data, out=opts.out)
        given = {f.name for f in fields(TrainOptions) if getattr(opts, f.name) != getattr(default, f.name)}
    return replace(opts, **{k: v for k, v in PRESETS[opts.preset].items() if k not in given})
