"""Exceptions a user can act on. Each message names the model, field or value at fault."""


class QdemoError(Exception):
    """Base class for qdemo errors that carry a user-facing message."""


class RegistryError(QdemoError, ValueError):
    """models.yaml is malformed or names something unknown."""


class SourceError(QdemoError):
    """Weights could not be located, verified or materialised."""


class PromptTooLongError(QdemoError, ValueError):
    """Even the newest turn alone does not fit the model's context."""
