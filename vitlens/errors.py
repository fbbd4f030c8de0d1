"""The one exception type for user mistakes (bad paths, options, files).

The CLI prints a `UserError` as one line and exits non-zero, without a traceback;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the file, sample or option."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
