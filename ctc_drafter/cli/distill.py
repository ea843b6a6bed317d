"""`ctc-drafter distill`: not built yet."""

from ..errors import CTCDrafterError


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="(not built yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise CTCDrafterError("'distill' is not built yet")
