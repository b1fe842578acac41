"""The one exception type users see.

Anything a user can cause (a bad recipe, a bad row, a missing file) raises `SafeAlignError` with a
one-line message that names the field or row and says how to fix it. The CLI prints the message and
exits non-zero without a traceback; everything else is a bug and keeps its traceback.
"""


class SafeAlignError(Exception):
    """A user-facing error: its message is complete on one line and is printed as is."""
