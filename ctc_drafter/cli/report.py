"""`ctc-drafter report`: not built yet."""

from ..errors import CTCDrafterError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="(not built yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise CTCDrafterError("'report' is not built yet")
