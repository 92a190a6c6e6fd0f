"""User-facing errors. The CLI prints the message and exits non-zero; nothing is half-written."""


class W2SError(Exception):
    """Base of every error a user can fix: the message says what and where."""


class InputError(W2SError, ValueError):
    """A malformed file, a missing field, a value out of range."""


class NotFound(W2SError, LookupError):
    """An unknown dataset, model, round or job."""


class StateError(W2SError):
    """An operation that the current state does not allow."""
