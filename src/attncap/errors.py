"""The project's own error type: a user mistake, reported as one line by the CLI."""


class AttncapError(ValueError):
    """A problem the user can fix; the message says what and where.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """
