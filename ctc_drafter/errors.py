"""One exception type for problems the user can fix (bad paths, bad options, bad data, a full disk),
and the two file operations every JSON file of the project goes through: reading one JSON object
with one-line errors, and writing one atomically.

The CLI prints these as one line on stderr and exits 2; everything else is a bug.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


class CTCDrafterError(Exception):
    """A user-facing error: the message alone explains what to fix."""


def fault_reason(e: BaseException) -> str | None:
    """Why a write failed, in words, when `e` is a file-system fault (full disk, read-only folder,
    permissions); None for anything else.

    Libraries report such faults in their own types: safetensors as SafetensorError ("... (os error
    28)"), torch.save as RuntimeError ("... file write failed", "[enforce fail at inline_container.cc]
    ... unexpected pos").
    """
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    text = str(e)
    if type(e).__name__ == "SafetensorError" and "os error" in text.lower():
        return text.strip().splitlines()[0]
    torch_writer = ("file write failed", "PytorchStreamWriter failed", "inline_container.cc")  # torch.save's zip writer
    if isinstance(e, RuntimeError) and any(s in text for s in torch_writer):
        return "file write failed (disk full or folder not writable?)"
    return None


@contextmanager
def writing(path, what: str = "", kept: str = ""):
    """Turn a file-system fault while writing `path` into one CTCDrafterError that names the path,
    the reason and (`kept`) what finished work survived."""
    try:
        yield
    except CTCDrafterError:
        raise
    except Exception as e:  # noqa: BLE001 - only faults are converted; the rest re-raises as is
        reason = fault_reason(e)
        if reason is None:
            raise
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename and str(e.filename) != str(path) else ""
        raise CTCDrafterError(f"cannot write {what + ' ' if what else ''}{path}{where}: {reason}"
                              + (f"; {kept}" if kept else "")) from e


def read_json_object(path, what: str) -> dict:
    """The JSON object in `path` (a manifest, a draft's config.json, a --config file); any fault is one
    CTCDrafterError naming `what` and the file: missing, unreadable, not UTF-8, not JSON, not an object."""
    where = f"{what} {path}"
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CTCDrafterError(f"{what} not found: {path}") from e
    except OSError as e:
        raise CTCDrafterError(f"{where} is unreadable: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise CTCDrafterError(f"{where} is corrupt: not UTF-8 text (byte {e.start})") from e
    except (ValueError, RecursionError) as e:  # bad JSON, numbers too long to parse, absurd nesting
        raise CTCDrafterError(f"{where} is corrupt: not valid JSON ({str(e).splitlines()[0]})") from e
    if not isinstance(obj, dict):
        raise CTCDrafterError(f"{where} is corrupt: a JSON object was expected (the file must hold a JSON object, "
                              f"not a {type(obj).__name__})")
    return obj


def write_json_atomic(path, obj, indent: int = 2) -> None:
    """Write `obj` as JSON through a temporary file renamed into place: a crash leaves the old file or
    the new one, never half of one. File-system faults propagate (wrap the call in `writing`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)
