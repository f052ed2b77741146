"""User-facing errors: each names the problem and the fix, so the CLI can print it without a traceback."""


class PrivtuneError(Exception):
    """Base class of every error privtune raises on bad input."""


class ConfigError(PrivtuneError):
    """An unknown recipe or key, or a value outside its range."""


class DataError(PrivtuneError):
    """Missing, corrupt or inconsistent training or evaluation data."""


class ModelError(PrivtuneError):
    """A model or LoRA that cannot be loaded or does not fit the base model."""


def run_command(action, argv: list[str], help_text: str):
    """The shared front of the key=value CLIs: (0, None) after printing `help_text` for no arguments or -h;
    (2, None) after printing a PrivtuneError as one line; else (0, action(argv))."""
    import sys

    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(help_text)
        return 0, None
    try:
        return 0, action(argv)
    except PrivtuneError as exc:
        print(f"privtune: error: {exc}", file=sys.stderr)
        return 2, None
