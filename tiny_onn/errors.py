"""The one exception type for user errors: the CLI prints its message and exits non-zero."""


class TinyOnnError(ValueError):
    """A problem with the user's input (a path, an option, a file's contents), with a message saying what to do."""
