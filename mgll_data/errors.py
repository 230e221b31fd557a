"""Errors a user can cause. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input (path, layout, flag, file) that they can fix."""


class ItemError(Exception):
    """One item cannot become a record; it goes to quarantine with this message as the reason."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
