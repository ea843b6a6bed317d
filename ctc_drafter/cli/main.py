"""`ctc-drafter`: one command, one subcommand per pipeline stage.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
User errors (CTCDrafterError) become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import CTCDrafterError

COMMANDS = ["generate", "demo", "distill", "train", "eval", "report"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctc-drafter", description="Lossless speculative decoding with a CTC-based draft model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f"ctc_drafter.cli.{'eval_cmd' if name == 'eval' else name}")
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CTCDrafterError as e:
        print(f"ctc-drafter: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctc-drafter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
