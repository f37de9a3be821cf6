"""Errors a user can cause: the CLI prints their message, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (a path, a setting, a file), with a message that says what to do."""


class ImageError(UserError):
    """An input image that cannot be used: not an image, corrupt, truncated or too large."""

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status
