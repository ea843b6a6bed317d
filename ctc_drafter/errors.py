"""One exception type for problems the user can fix (bad paths, bad options, bad data, a full disk).

The CLI prints these as one line on stderr and exits 2; everything else is a bug.
"""

from __future__ import annotations

from contextlib import contextmanager


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
