"""Typed errors. Each message says what went wrong and what to do next.

The CLI prints `error: <message>` and exits with `exit_code`; set QWQ_LOCAL_DEBUG=1 for the
traceback.
"""

from __future__ import annotations


class QwQLocalError(Exception):
    """Base of every error qwq-local raises on purpose."""

    exit_code = 1


class CheckpointError(QwQLocalError):
    """A Hugging Face checkpoint is missing files or is damaged."""

    exit_code = 3


class UnsupportedModelError(QwQLocalError):
    """The checkpoint or GGUF is not an architecture qwq-local handles."""

    exit_code = 3


class BadModelFileError(QwQLocalError):
    """A GGUF file failed validation; the message names the first fault."""

    exit_code = 4


class ModelNotFoundError(QwQLocalError):
    """A model name or path could not be resolved (offline, not cached, or no such file)."""

    exit_code = 5


class HubError(QwQLocalError):
    """Downloading or verifying from the Hugging Face Hub failed."""

    exit_code = 6


class DiskSpaceError(QwQLocalError):
    """Not enough free disk space for the file about to be written."""

    exit_code = 7


class InsufficientMemoryError(QwQLocalError):
    """The model with these settings fits in no device; the message lists alternatives."""

    exit_code = 8


class ContextOverflowError(QwQLocalError):
    """The prompt does not fit the context window."""

    exit_code = 9


class QuantizeError(QwQLocalError):
    """llama.cpp's quantizer refused or failed, or the requested type is invalid."""

    exit_code = 10


class ImatrixError(QwQLocalError):
    """An importance-matrix file is unreadable or does not match the model."""

    exit_code = 10


class TemplateError(QwQLocalError):
    """A chat template failed to compile or render, or broke the sandbox's limits."""

    exit_code = 11


class RuntimeLoadError(QwQLocalError):
    """llama.cpp failed to load a model or create a context."""

    exit_code = 12


class UsageError(QwQLocalError):
    """An option value or combination is invalid."""

    exit_code = 2


class RpcError(QwQLocalError):
    """An RPC worker is unreachable, busy, lost mid-run, or this llama.cpp build has no RPC."""

    exit_code = 13
