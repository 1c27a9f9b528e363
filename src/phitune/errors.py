"""Exceptions phitune raises. Each message says what is wrong, where, and how to fix it."""


class PhituneError(Exception):
    """Base class of every error phitune raises on purpose."""


class ConfigError(PhituneError, ValueError):
    """A configuration key or value is wrong (the message names the key).

    ``key``: the dotted key it blames (``"training_config.learning_rate"``, ``"data"``), or None when no single key
    is at fault; ``load_config`` uses it to point at the YAML line or the ``--set`` override that set the key.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # keep the key through pickling (multiprocessing, torchrun workers)
        return type(self), (str(self), self.key)


class DataError(PhituneError, ValueError):
    """A data file or record is wrong (the message names the file and line or row)."""


class AdapterError(PhituneError, ValueError):
    """An adapter does not fit the model it is applied to (the message names the module and both shapes)."""


class CheckpointError(PhituneError, RuntimeError):
    """A checkpoint is missing, broken or incompatible with the config."""


class StorageError(PhituneError, OSError):
    """A file could not be written (disk full, read-only, no permission): the message names the path."""
