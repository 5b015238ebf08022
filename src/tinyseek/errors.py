"""The errors tinyseek raises for problems with a user's input, grouped by the standard type they refine.

Library callers catch the standard types (`ValueError`, `OSError`); the CLI turns exactly these classes into one line
and exit code 2. Anything else that escapes is a bug and keeps its traceback.
"""


class TinySeekError(Exception):
    """Base of every error that describes the user's input rather than a bug in tinyseek."""


class ConfigError(TinySeekError, ValueError):
    """A configuration value, flag or combination of them is invalid; the message names the field."""


class InputError(TinySeekError, ValueError):
    """Data, a tokenizer, a prompt or a request that cannot be used as given; the message names it."""


class FileError(TinySeekError, OSError):
    """A file or directory is missing, unreadable, unwritable or corrupt; the message names the path."""
