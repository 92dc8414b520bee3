"""The one exception type for problems the user can fix: bad input, an unsupported model, a broken bundle.

The CLI prints such an error as one line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Raised for input the engine cannot accept; the message says what was wrong and what is accepted."""
