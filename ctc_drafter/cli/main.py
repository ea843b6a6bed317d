"""`ctc-drafter`: one command, one subcommand per pipeline stage.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
User errors (CTCDrafterError) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import CTCDrafterError
from .checks import check_command

COMMANDS = ["generate", "demo", "make-prompts", "distill", "corpus", "train", "eval", "report", "serve", "export"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, with the same prefix as every other user error
        self.exit(2, f"ctc-drafter: error: {message} (see `{self.prog} --help`)\n")


class _OneLineStderr(logging.Handler):
    """Library log records as `ctc-drafter: warning: ...` lines on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"ctc-drafter: {record.levelname.lower()}: {self.format(record)}\n")
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def install_log_handler() -> None:
    """The CLI shows the library's info and warnings (an API user decides with `logging` instead);
    `serve` configures logging itself (--log-level)."""
    lib = logging.getLogger("ctc_drafter")
    if not any(isinstance(h, _OneLineStderr) for h in lib.handlers):
        lib.addHandler(_OneLineStderr(logging.INFO))
    lib.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctc-drafter", description="Lossless speculative decoding with a CTC-based draft model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f"ctc_drafter.cli.{'eval_cmd' if name == 'eval' else name.replace('-', '_')}")
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's one-line error: an exit code like any other
        return e.code if isinstance(e.code, int) else 2
    if args.command != "serve":
        install_log_handler()
    try:
        check_command(args)
        return int(args.func(args) or 0)
    except CTCDrafterError as e:
        print(f"ctc-drafter: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault (full disk, read-only folder) where no command caught it
        where = f" {e.filename}" if e.filename else ""
        print(f"ctc-drafter: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_end_progress_lines()}ctc-drafter: interrupted", file=sys.stderr)
        return 130


def _end_progress_lines() -> str:
    """Close the progress bars an interrupt left open (their loops' frames live on in the traceback), so
    that the next line starts a line of its own; on a terminal without a bar, after the echoed ^C, a newline."""
    from tqdm import tqdm

    bars = [b for b in list(getattr(tqdm, "_instances", ())) if not b.disable]
    for bar in bars:
        bar.close()
    return "" if bars or not sys.stderr.isatty() else "\n"


if __name__ == "__main__":
    sys.exit(main())
