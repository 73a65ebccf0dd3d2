"""nexlab's one error type for bad input.

Every error a user can cause (a wrong parameter, a malformed checkpoint, a damaged GGUF, a tensor of
the wrong dtype or shape, NaN values) is a :class:`NexlabError` whose message names the parameter,
file or tensor and what is wrong with it. It subclasses :class:`ValueError`, so ``except ValueError``
keeps working. The ``nexlab`` command prints a NexlabError (and an OSError: a missing file, a full
disk) as one line; any other exception is a programming error and keeps its traceback.
"""

from __future__ import annotations


class NexlabError(ValueError):
    """Bad input to nexlab: the message names what is wrong and where."""


class NexlabTypeError(NexlabError, TypeError):
    """Input of the wrong type or dtype (a tensor that is not floating point, a config that is not a
    dict); also a TypeError, for callers that catch one."""


class NexlabKeyError(NexlabError, KeyError):
    """Something asked for by name is not there (a tensor not in a checkpoint or file); also a KeyError."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class ToolError(NexlabError, RuntimeError):
    """llama.cpp (a tool, its converter or the library) failed on the user's input or machine; the message
    names the tool and the file and carries the tool's last lines. Also a RuntimeError."""
