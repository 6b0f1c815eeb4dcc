"""The one exception type the CLI turns into a one-line error (no traceback)."""


class DermrayError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""
