"""One exception type for every error a user can fix (bad file, column, config key, path).

The CLI prints these as a one-line red message and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class QinError(Exception):
    """An error in the user's input: names the file, column, key and (where it applies) the row."""
