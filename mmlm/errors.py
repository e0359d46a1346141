"""Errors shared by layers that may not import each other (e.g. models and data both raise DataError)."""


class DataError(ValueError):
    """Bad input data; the message names the source (file, line/row/key) and what was expected."""
