"""Errors of the input side, each naming the file or value at fault."""


class DataError(Exception):
    """The data on disk is missing or wrong: the message names the file and what is wrong with it."""
