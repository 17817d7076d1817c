"""One error type for everything a user can get wrong.

The CLI turns a :class:`UserError` into one line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a path, a file, a name, a number. The message is the whole story."""


class MissingExtra(UserError):
    """An optional extra (``pip install leandiff[NAME]``) is not installed: what needs it cannot run here, the
    rest can (a study skips the rows that need it, with a note)."""
