"""Errors meant for the user: the CLI prints their message, without a traceback."""


class GliogradeError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(GliogradeError):
    """A data folder, NIfTI file, cache or folds file that cannot be used as it is."""


def unknown_name(where: str, name, registered, what: str) -> str:
    """The one line for a name that no table holds: `--loss focl is not a registered loss (ce, focal, ldam); did you
    mean 'focal'?` (`where`: the flag, file or key that gave it; `registered`: the table's names)."""
    import difflib

    names = sorted(registered)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where} {name} is not a registered {what} ({', '.join(names) or 'none registered'}){hint}"
