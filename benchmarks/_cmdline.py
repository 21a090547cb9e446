"""What a benchmark records as "the command": its arguments without where the output went."""

from __future__ import annotations

import sys


def shown_args(
    argv: list[str] | None, *, output_flags: tuple[str, ...] = ("--out", "--output")
) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) without ``--out FILE`` / ``--output FILE``."""
    args = list(argv if argv is not None else sys.argv[1:])
    for flag in output_flags:
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    return args
