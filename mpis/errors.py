"""The one error type a user sees: the CLI prints its message as a single line and exits non-zero."""


class MpisError(ValueError):
    """A problem with the user's input (arch string, file, option) that they can act on."""
