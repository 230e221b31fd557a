"""Errors a user can cause. `mgll-train` prints them as one line, never as a traceback."""


class UserError(ValueError):
    """A problem with the user's input that they can fix: a bad flag, a missing file or folder,
    a dataset that is not an mgll build, a checkpoint that does not fit.

    It is a `ValueError` because these checks raised `ValueError` before it existed, so callers
    that catch that keep working; the CLI catches `UserError` only, so any other `ValueError` is
    a bug and keeps its traceback.
    """
