"""The one error type for problems with what the user gave: flags, data, files.

Library code raises `UserError` (or `UsageError` for flags); each command's guard (`common.cli.main_guard`)
prints it as one `error: ...` line and exits with its status. Every other exception is a bug, or a failure
the user cannot fix from the command line, and keeps its traceback.

`UserError` is a `ValueError`, so callers that validate values the usual way keep working; the guard still
prints only `UserError`s, never a plain `ValueError` (the model's internal consistency checks raise those).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad data or files (a sample, an image, a dataset folder): exit status 1."""

    exit_status = 1


class UsageError(UserError):
    """Bad flags or flag combinations: exit status 2, as argparse uses for its own usage errors."""

    exit_status = 2
