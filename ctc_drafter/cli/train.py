"""`ctc-drafter train`: not built yet."""

from ..errors import CTCDrafterError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="(not built yet)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise CTCDrafterError("'train' is not built yet")
