"""`ctc-drafter eval`: not built yet."""

from ..errors import CTCDrafterError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="(not built yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise CTCDrafterError("'eval' is not built yet")
