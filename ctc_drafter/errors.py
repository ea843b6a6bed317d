"""One exception type for problems the user can fix (bad paths, bad options, bad data).

The CLI prints these as one line on stderr and exits non-zero; everything else is a bug.
"""


class CTCDrafterError(Exception):
    """A user-facing error: the message alone explains what to fix."""
