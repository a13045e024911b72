"""Errors a user fixes by changing the command: entry points print them as one line and exit 2."""


class UsageError(ValueError):
    """The run asked for something that cannot work; the message says what to change."""
