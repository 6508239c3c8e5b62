"""Exceptions that the command line maps to exit statuses (see ../shared/CLI.md: 2 bad input, 1 failure)."""


class InputError(ValueError):
    """Bad usage or bad input: a malformed, hostile or unsupported file or flag value (exit status 2).

    The message is one line that names the offending file or flag.
    """
