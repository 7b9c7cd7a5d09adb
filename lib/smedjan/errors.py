"""The one exception type for bad user input.

Tools raise `UserError` for anything the user can fix (a missing file, a corrupt
artifact, a flag out of range). `smedjan.cli.tool` turns it into one line on stderr
and exit status 2. Any other exception is a bug: it keeps its traceback and exits 1.

    >>> raise UserError("train.bin: wrong magic; regenerate it with `smedjan prepare`")
    Traceback (most recent call last):
    smedjan.errors.UserError: train.bin: wrong magic; regenerate it with `smedjan prepare`
"""


class UserError(ValueError):
    """Bad input that the user can fix. The message is one line and names the file."""

    def __init__(self, message: str):
        # One line, always: a multi-line message would break the CLI contract.
        super().__init__(" ".join(str(message).split("\n")).strip())
