"""The one exception type users see.

Anything a user can cause (a bad recipe, a bad row, a missing file) raises `SafeAlignError` with a
one-line message that names the field or row and says how to fix it. The CLI prints the message and
exits 2 without a traceback (a Job does not retry it: the same input fails the same way). A failure of
something outside the run that may pass by itself (a judge endpoint that stayed down through its
retries) is a `TransientError`: one line too, but exit 75 (EX_TEMPFAIL), which a Job retries.
Everything else is a bug and keeps its traceback.
"""


class SafeAlignError(Exception):
    """A user-facing error: its message is complete on one line and is printed as is."""


class TransientError(SafeAlignError):
    """A user-facing error that a later retry of the same run may not hit (an outage of a service the
    run calls): exit `exit_code`, which the charts' podFailurePolicy leaves to the Job's backoffLimit."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
