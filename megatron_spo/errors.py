"""The one exception type for problems a user can fix (bad input, bad config, bad files).

The CLI prints a `UserError` as a single line on stderr and exits with status 2; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or value at fault."""
