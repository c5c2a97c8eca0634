"""Errors raised by the datamodules."""


class DataError(RuntimeError):
    """The data cannot be found, read or used; the message is one line a user can act on."""
