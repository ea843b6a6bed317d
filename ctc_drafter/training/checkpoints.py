"""A training run's folder (see train.py for its layout): exporting a loadable draft, making CKPT
itself the latest draft, the epochs whose state is saved, the trainer state a --recover reads, and
clearing an earlier run. Folders are written under a temporary name and renamed when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CTCDrafterError, read_json_object
from .run_log import LOG

TRAINER_STATE = "trainer_state.json"
RUN_ARGS = "train_args.json"  # written first: marks a folder as a training run's


def check_out_folder(out: Path) -> None:
    """An existing --out must be empty or a training run's own folder: train writes config.json and
    model.safetensors at its top, which would replace another folder's (a base's, a draft's) files."""
    if not out.is_dir() or (out / RUN_ARGS).is_file() or (out / LOG).is_file() or existing_states(out):
        return
    other = next(iter(sorted(out.iterdir())), None)
    if other is not None:
        raise CTCDrafterError(f"--out {out} holds files train did not write (e.g. {other.name}); "
                              "give an empty or new folder")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing one is swapped out, never half-overwritten."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def export_draft(config, state_dict: dict, directory: Path) -> None:
    """Write a loadable draft folder atomically from a (possibly gathered) state dict."""
    from ..draft import draft_class

    model = draft_class(config)(config)
    model.load_state_dict({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                           for k, v in state_dict.items()})
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    replace_dir(tmp, directory)


def publish_top_level(epoch_dir: Path, out: Path) -> None:
    """Make CKPT itself the latest draft: copy config + weights next to the run's folders, atomically each."""
    for name in ("config.json", "model.safetensors"):
        tmp = out / (name + ".tmp")
        shutil.copyfile(epoch_dir / name, tmp)
        os.replace(tmp, out / name)


def existing_states(out: Path) -> list[int]:
    return sorted(int(p.name.split("_", 1)[1]) for p in out.glob("state_*")
                  if p.is_dir() and p.name.split("_", 1)[1].isdigit())


def clear_run(out: Path) -> None:
    for p in list(out.glob("state_*")) + list(out.glob("epoch_*")) + [out / "tensorboard"]:
        if p.is_dir() and (p.name == "tensorboard" or p.name.split("_", 1)[1].split(".")[0].isdigit()):
            shutil.rmtree(p, ignore_errors=True)
    for name in (LOG, "config.json", "model.safetensors"):
        (out / name).unlink(missing_ok=True)


def read_trainer_state(state_dir: Path) -> dict:
    """state_N/trainer_state.json, with the keys --recover needs."""
    path = state_dir / TRAINER_STATE
    saved = read_json_object(path, "trainer state")
    if not isinstance(saved.get("draft_config"), dict) or "global_step" not in saved:
        raise CTCDrafterError(f"trainer state {path} is incomplete (no draft_config or global_step)")
    return saved
