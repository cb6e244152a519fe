"""Errors that reach the user as one line (the CLI prints them without a traceback)."""


class RtnsError(Exception):
    """Base of every error whose message is meant for the user as it stands."""


class UserInputError(RtnsError):
    """Bad input from the user: a missing or unreadable file, a bad option value."""


def first_validation_error(exc: Exception) -> tuple[str, str]:
    """(dotted location, message) of the first error of a pydantic ValidationError, so a
    boundary can report it as one sentence."""
    first = exc.errors()[0]  # type: ignore[attr-defined]
    return ".".join(str(p) for p in first["loc"]) or "(top level)", first["msg"]
