"""Errors meant for the user: the CLI prints their message, without a traceback."""


class GliogradeError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(GliogradeError):
    """A data folder, NIfTI file, cache or folds file that cannot be used as it is."""
