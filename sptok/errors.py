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


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: a 50 MB value named in an error must not
    become a 50 MB line."""
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > limit:
        return f"{text[:limit]!r}... ({len(text):,} characters)"
    try:
        r = repr(value)
    except ValueError:   # an int of more digits than Python will print
        return "a number too long to show"
    return r if len(r) <= limit else f"{r[:limit]}... ({len(r):,} characters)"
