"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(ValueError):
    """Bad input with a message that says what to do. The CLI prints it without a traceback."""
