"""Errors a user can cause: reported as one line on stderr with exit code 2."""


class UserError(Exception):
    """Bad input (a file, a flag, a checkpoint): the message says what and how to fix it."""
