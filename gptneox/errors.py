"""The one base type of every mistake a user can fix, and how a command reports it.

A bad flag, config value, file or record raises a subclass of `UserError` whose message names the file,
line, key or value. Commands catch `UserError` only and print it as one line (exit status 2); any other
exception is a bug, or a failure the message could not explain, and keeps its traceback.

Subclasses keep the built-in type they replaced (`ValueError`, `FileNotFoundError`) as a second base, so
callers that caught those still do.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix; the message says what and where."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory that was named (or that a named directory must hold) does not exist."""


def invoked_name() -> str:
    """The command as the user typed it, for usage and error lines: `python -m gptneox.train` when run as a
    module (also what the deepspeed launcher's --module runs), else the script or console command's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name != "__main__":  # `python -m PACKAGE` runs PACKAGE.__main__
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def report_user_error(prog: str, error: UserError) -> int:
    """Print `PROG: error: MESSAGE` on stderr and return the exit status every command uses for it."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT


def run_command(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's `main`; a UserError becomes one line and exit status 2, anything else propagates."""
    try:
        return main() or 0
    except UserError as error:
        return report_user_error(prog, error)
