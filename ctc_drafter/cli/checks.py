"""Command-line input, checked where it enters: the argparse types that need the decoder's or the
models' rules, and the checks of a whole parsed command (text that is not UTF-8, a base folder that would
run its own code). Number, seed and thread-count types live in ctc_drafter/validate.py (shared with
training's options); they are re-exported here for the parsers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..decoding.generate import MAX_BUDGET  # noqa: F401 - the decoder's limits, one home
from ..decoding.verify import MIN_TEMPERATURE
from ..errors import CTCDrafterError
from ..models.base import resolve_device
from ..validate import MAX_SEED, accepted_by, finite_float, int_in, threads  # noqa: F401 - the parsers' types


def temperature(text: str) -> float:
    """argparse type: 0 (greedy) or a finite temperature >= MIN_TEMPERATURE."""
    v = finite_float(0.0)(text)
    if 0 < v < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"{v:g} is too small to sample with: use 0 (greedy) or >= {MIN_TEMPERATURE:g}")
    return v


# argparse type: auto, cpu, cuda[:N] or mps, present in this build and on this machine (resolve_device's rules)
device = accepted_by(resolve_device)


# ---- a parsed command --------------------------------------------------------------------------

def _flag(dest: str) -> str:
    return dest.upper() if dest in ("spec",) else "--" + dest.replace("_", "-")


def check_utf8_args(args) -> None:
    """Every text argument must be UTF-8: Python keeps undecodable argv bytes as lone surrogates,
    which the tokenizer and the JSON writers reject deep inside a run."""
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise CTCDrafterError(f"argument {_flag(dest)} is not valid UTF-8 text") from None


def needs_remote_code(folder: Path) -> str | None:
    """The reason a local model folder needs its own Python code to load, or None.

    transformers runs a folder's code when its config maps the model to classes in that folder
    (`auto_map`) and its model_type is not one transformers knows; without an explicit
    trust_remote_code it then asks on stdout (which breaks --json) or fails.
    """
    for name in ("config.json", "tokenizer_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the loader reports an unreadable config in its own words
        if not isinstance(cfg, dict) or not cfg.get("auto_map"):
            continue
        if name == "config.json":
            from transformers import CONFIG_MAPPING

            if cfg.get("model_type") in CONFIG_MAPPING:
                continue  # transformers has the class itself and uses it
        return f"{p} maps to Python code shipped in the folder (auto_map)"
    return None


def check_remote_code(args) -> None:
    """Refuse a base folder that would run its own code unless --trust-remote-code was given."""
    if getattr(args, "trust_remote_code", False):
        return
    for dest in ("base_model", "tokenizer"):
        name = getattr(args, dest, None)
        if not isinstance(name, str) or name == "default":
            continue
        p = Path(name).expanduser()
        reason = needs_remote_code(p) if p.is_dir() else None
        if reason:
            raise CTCDrafterError(f"{reason}; ctc-drafter runs a model's own code only with --trust-remote-code")


def check_command(args) -> None:
    """Checks every subcommand shares, before it starts."""
    check_utf8_args(args)
    check_remote_code(args)


def check_max_new_tokens(max_new_tokens: int, base) -> None:
    """--max-new-tokens cannot exceed the base's context: no answer can be longer."""
    if max_new_tokens > base.max_length:
        raise CTCDrafterError(f"--max-new-tokens {max_new_tokens} is more than the base's context "
                              f"({base.max_length} tokens, prompt included)")

