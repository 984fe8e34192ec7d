"""The one exception type users see.

Anything raised as `HibariError` is printed by the CLI as a single line (`hibari: error: ...`) with exit code 2,
never as a traceback. Raise it for bad input: the message names the file/field and what was expected.
"""


class HibariError(Exception):
    """A user-facing error: bad config, bad input file, bad command line."""


class ConfigError(HibariError):
    """A config file or override that does not validate."""
