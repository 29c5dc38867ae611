"""What every command line shares: one clear line for a user error, the traceback only on request.

    def main(argv=None) -> int:
        p = argparse.ArgumentParser(...)
        add_debug_flag(p)
        ...

    if __name__ == "__main__":
        sys.exit(guarded(main)())

A *user error* is a problem with what the user gave us (a missing file, a bad config value, a
corrupt shard, a refused resume), as opposed to a bug of ours. Such errors derive from
`UserError` or are one of the OS errors in `USER_ERRORS`. They print `error: <message>` on stderr
and exit with status 2, the convention of argparse for bad usage. Anything else is a bug and keeps
its traceback. `--debug` or `ALIP_DEBUG=1` re-raises user errors too, for a full traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

USER_ERROR_STATUS = 2


class UserError(Exception):
    """A problem with the user's input or files, explained by its message alone (no traceback)."""


# OS errors that name a path the user gave: their message is the explanation.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error (also: ALIP_DEBUG=1)"
    )


def debug_requested(argv: list[str] | None = None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("ALIP_DEBUG", "") not in ("", "0")


def describe(error: BaseException) -> str:
    """One line for a user error; OS errors say what failed on which path."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror.lower()}: {error.filename}"
    text = str(error) or type(error).__name__
    return text.strip()


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv=None) -> int`: user errors become `error: ...` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as e:
            if debug_requested(argv):
                raise
            print(f"error: {describe(e)}", file=sys.stderr)
            return USER_ERROR_STATUS

    return wrapper
