"""The project's user-facing error: a config or input that cannot work, found before any heavy work starts.

Everything that checks a contract raises it with the field and the fix in its message; ``train.main`` prints it and
exits 2. Imports nothing.
"""


class ConfigError(ValueError):
    """A config or input that cannot work, found before any heavy work starts."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): the save failed and earlier checkpoints are intact."""
