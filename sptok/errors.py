"""The one exception type for errors a user can cause (bad input, bad flags, full disk)."""


class SptokError(Exception):
    """A user-facing error: the message names the file / line / key and what was expected.

    The CLI prints it as one paragraph and exits non-zero; it never shows a traceback.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # picklable across worker processes
        return (SptokError, (self.message,))


class Stopped(Exception):
    """Not an error: a run stopped early on a signal (pre-emption) after saving its work. The CLI prints the
    message and exits with 128 + the signal's number, as a process killed by it would, so that a scheduler
    sees the job did not finish."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.message, self.signum = message, signum

    def __reduce__(self):
        return (Stopped, (self.message, self.signum))
