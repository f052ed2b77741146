"""User-facing errors: each names the problem and the fix, so the CLI can print it without a traceback."""


class PrivtuneError(Exception):
    """Base class of every error privtune raises on bad input."""


class ConfigError(PrivtuneError):
    """An unknown recipe or key, or a value outside its range."""


class DataError(PrivtuneError):
    """Missing, corrupt or inconsistent training or evaluation data."""


class ModelError(PrivtuneError):
    """A model or LoRA that cannot be loaded or does not fit the base model."""
