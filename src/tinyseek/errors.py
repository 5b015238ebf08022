class UserError(Exception):
    """A problem with the user's input: the CLI reports it as one line and a non-zero exit, never a traceback."""
