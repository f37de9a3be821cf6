"""Errors a user can cause: the CLI prints their message, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (a path, a setting, a file); the message says what to do."""


class ImageError(UserError):
    """An input image that cannot be used: not an image, corrupt, truncated or too large."""

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


class TrainingFailed(RuntimeError):
    """Training stopped on a failure the user did not cause (a worker crashed, ran out of memory).

    The message names the worker and its error; the CLI prints it without a traceback.
    """
