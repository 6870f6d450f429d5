"""Errors that jaxgan raises for problems a user can fix."""


class JaxganError(Exception):
  """A problem with the user's input, data or files; the message says the fix.

  Programs built on jaxgan (the examples) print these messages without a
  traceback.
  """


class DataError(JaxganError):
  """The dataset is missing, incomplete or cannot be prepared."""


class CheckpointError(JaxganError):
  """A checkpoint is missing, unreadable or incompatible with the config."""
