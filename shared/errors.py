"""One base class for errors a user can fix: the CLI prints their message on one line (exit 2), no traceback."""


class UserError(Exception):
    """Raise a subclass with a message that says what went wrong and what to do."""
