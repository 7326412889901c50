"""Typed user-facing errors. The core raises them; the CLI renders them once."""


class TransferkitError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""


class DataError(TransferkitError):
    """The image folder cannot be used as given."""


class ConfigError(TransferkitError):
    """An option value, or a combination of them, is invalid."""


class WeightsError(TransferkitError):
    """Pretrained weights cannot be found, fetched or loaded."""


class ArtifactError(TransferkitError):
    """A run directory, feature file or output file cannot be read or written."""
