"""User errors: bad recipes, paths or checkpoints. The entry point turns them into one line and
exit code 2; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem the user can fix; the message names the key or path and what is allowed."""
