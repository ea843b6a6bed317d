"""`python -m ctc_drafter.train ...` = `ctc-drafter train ...`; made for `accelerate launch -m ctc_drafter.train`."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from .cli.main import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
