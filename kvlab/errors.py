"""The exceptions kvlab raises for bad input or a missing resource.

Each carries one line a user can act on; the CLI prints it without a traceback.
"""


class KvlabError(Exception):
    """Base class of every error kvlab raises on purpose."""


class ConfigError(KvlabError, ValueError):
    """A configuration value, key or file is invalid."""


class ModelUnavailableError(KvlabError):
    """A model cannot be loaded (unknown name, hub unreachable, missing file)."""


class DatasetUnavailableError(KvlabError):
    """A dataset cannot be loaded (unknown name, hub unreachable, missing local copy)."""


class PromptTooLongError(KvlabError, ValueError):
    """A prompt plus its requested output does not fit the model's context."""
