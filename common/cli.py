"""What a user sees when a command fails on their input: one clear line, exit code 1, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def user_message(error: BaseException) -> str:
    """The error's own message. A DataLoader worker re-raises its error with the worker's traceback folded into
    the message; the user needs the original message only."""
    message = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback (most recent call last)" in message and marker in message:
        message = message[message.rfind(marker) + len(marker):].strip()
    return message


def main_guard(run: Callable[[], object]) -> None:
    """Run a script's main; a user error (bad data or flags: ValueError) ends with one message and exit code 1."""
    try:
        run()
    except ValueError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        sys.exit(1)
