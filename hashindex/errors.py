"""One base class for every error a user can cause, so the CLI can print it as one line."""


class HashindexError(ValueError):
    """Bad input: the message names the input and what is wrong with it."""
