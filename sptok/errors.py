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
