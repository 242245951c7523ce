"""One exception type for every user-facing error: the CLI prints it as one line."""


class QuicksilverError(Exception):
    """Bad input or an unusable environment, explained in one sentence.

    The CLI turns it into ``error: <message>`` on stderr and exit status 2.
    """


def check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    """Raise QuicksilverError unless ``value`` is an integer (at least ``minimum``).

    The public functions check their arguments with it, so that the Python API and the CLI
    say the same sentence: ``max-tokens must be at least 1, got 0``.
    """
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise QuicksilverError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise QuicksilverError(f"{name} must be at least {minimum}, got {value}")
