"""The one exception type for problems a user can fix (bad input, bad config, bad files).

The CLI prints a `UserError` as a single line on stderr and exits with status 2; everything else
is a bug and keeps its traceback. `ArgumentParser` makes command-line mistakes (an unknown flag, a
value of the wrong type) the same one line instead of argparse's usage block.
"""

import argparse


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or value at fault."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise `UserError` (one line, exit 2), pointing at --help.
    Sub-commands made with `add_subparsers` are of this class too."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")
