"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class RtnsError(Exception):
    """Base of every error whose message is meant for the user as it stands."""


class UserInputError(RtnsError):
    """Bad input from the user: a missing or unreadable file, a bad option value."""
