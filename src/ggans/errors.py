"""User-facing errors: one line naming the key and what is allowed; the CLI prints them, exits 2."""


class GGansError(Exception):
    """Bad input from a user (config value, data file, impossible combination)."""


class ConfigError(GGansError):
    """A config value outside what is allowed."""


class DataError(GGansError):
    """A data file or folder that is missing or corrupt."""
