"""One exception type for every user-facing error: the CLI prints it as one line."""


class QuicksilverError(Exception):
    """Bad input or an unusable environment, explained in one sentence.

    The CLI turns it into ``error: <message>`` on stderr and exit status 2.
    """
