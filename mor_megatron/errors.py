"""The base of every error that a user's input causes (config, data, checkpoint, launch).

The CLIs print such errors as one line with exit code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the fix."""
