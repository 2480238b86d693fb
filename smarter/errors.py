"""The error type for bad input: its message says what to change."""


class ConfigError(ValueError):
    """Bad configuration or input, caught before any weights load; the message names the fix."""
