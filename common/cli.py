"""Where errors become messages: each command's guard prints a `UserError` as one `error: ...` line.

Exit status 2 for usage (bad flags), 1 for data and runtime problems; any other exception keeps its
traceback (it means a bug, and the traceback is what a report needs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from .errors import UserError

Result = TypeVar("Result")


def user_message(error: BaseException) -> str:
    """The error's own message. A DataLoader worker re-raises its error with the worker's traceback folded into
    the message; the user needs the original message only."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback (most recent call last)" in message and marker in message:
        message = message[message.rfind(marker) + len(marker):].strip()
    return message


def main_guard(run: Callable[[], Result]) -> Result:
    """Run a command's main and return its result; a `UserError` ends the process with one message."""
    try:
        return run()
    except UserError as error:
        print(f"error: {user_message(error)}", file=sys.stderr, flush=True)
        sys.exit(error.exit_status)
