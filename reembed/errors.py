"""One error hierarchy for the whole project.

Every error says whether retrying can help (`retriable`) and whether the caller's input is at
fault (`is_input_error`), as pymilvus's exceptions do, so the job's retry loop and the service's
HTTP mapping (4xx for input, 503 for retriable backend trouble) read one attribute each.
"""

from __future__ import annotations


class ReembedError(Exception):
    """Base class. Subclasses set the two flags below."""

    retriable: bool = False
    is_input_error: bool = False


class ConfigError(ReembedError):
    """A setting is wrong or names something that does not exist. Fails before any work starts."""

    is_input_error = True


class InputDataError(ReembedError):
    """Input files cannot be read or do not hold what the config says they hold."""

    is_input_error = True


class ModelMismatchError(ReembedError):
    """A collection was built with another model identity than the one being used on it."""

    is_input_error = True


class CapabilityError(ReembedError):
    """The Milvus server lacks a feature the requested mode needs."""

    is_input_error = True


class StoreUnavailableError(ReembedError):
    """Milvus cannot be reached or timed out. Retrying later may succeed."""

    retriable = True
