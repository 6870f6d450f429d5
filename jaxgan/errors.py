"""Errors that jaxgan raises for problems a user can fix."""

from typing import Any


def is_positive_integer(value: Any) -> bool:
  """Whether `value` is an `int` of at least 1 (`True` is not)."""
  return (isinstance(value, int) and not isinstance(value, bool)
          and value >= 1)


class JaxganError(Exception):
  """A problem with the user's input, data or files; the message says the fix.

  Programs built on jaxgan (the examples) print these messages without a
  traceback.
  """


class DataError(JaxganError):
  """The dataset is missing, incomplete or cannot be prepared."""


class CheckpointError(JaxganError):
  """A checkpoint is missing, unreadable or incompatible with the config."""
