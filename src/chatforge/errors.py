"""User-facing errors. The CLI prints these as one line (no traceback), exit code 2.

Subclass :class:`ChatforgeError` for anything caused by user input (a bad file, a bad
option, a missing model) and make the message name the file and line, or the option.
"""


class ChatforgeError(Exception):
    """Base class of errors caused by user input."""


class DataError(ChatforgeError):
    """Unreadable or unusable data (message names file and line or field)."""


class ConfigError(ChatforgeError):
    """A bad recipe key, option value or combination of options."""
