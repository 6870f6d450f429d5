"""Opt-in checks of the values that compiled functions are given.

Shapes and dtypes are checked when a function is traced, at no cost. Values
(float images outside [-1, 1], labels outside [0, num_classes)) exist only on
the device, and raising on them would make every step wait for the device.
jaxgan's functions therefore state these conditions as
`checkify.debug_check`s, which XLA removes from the compiled program, and
`checked` turns them on for one function: its calls then raise a
`JaxganError` for a bad value, at the price of one host sync per call.
"""

import functools
import os
import traceback
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from jaxgan.errors import JaxganError

# Images a little outside [-1, 1] from float rounding of a rescaling pass.
IMAGE_RANGE_TOLERANCE = 1e-3


def image_range(images: jax.Array) -> None:
  """States that float images `[B, H, W, C]` are finite and in [-1, 1]."""
  checkify.debug_check(
      jnp.all(jnp.abs(images) <= 1.0 + IMAGE_RANGE_TOLERANCE),
      'Float images must be finite and in [-1, 1] (uint8 images are '
      'rescaled from [0, 255]); got values from {} to {}, {} of them NaN. '
      'Map [0, 1] images with 2 * x - 1, or pass uint8.',
      jnp.nanmin(images), jnp.nanmax(images), jnp.sum(jnp.isnan(images)))


def label_range(labels: jax.Array, num_classes: int, who: str) -> None:
  """States that int labels `[B]` lie in [0, num_classes)."""
  checkify.debug_check(
      jnp.all((labels >= 0) & (labels < num_classes)),
      f'{who} labels must lie in [0, {num_classes}); got labels from {{}} '
      'to {}.', jnp.min(labels), jnp.max(labels))


def _is_array_tree(value: Any) -> bool:
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(
      isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)


_LIBRARY_DIRS = tuple(os.path.dirname(module.__file__) + os.sep
                      for module in (jax, flax, optax))


def _where(error: Exception) -> str:
  """' (file:line, in function)' of the traced code that failed a check."""
  # checkify raises from the error it recorded while tracing; that error's
  # traceback ends in the code that made the failing operation.
  frames = [frame for frame in traceback.extract_tb(
      getattr(error.__cause__, '__traceback__', None))
            if frame.filename != __file__]
  if not frames:
    return ''
  where = [frames[-1]]
  # Inside jax, flax or optax, also name the last call from the code that
  # uses them.
  outside = [frame for frame in frames
             if not frame.filename.startswith(_LIBRARY_DIRS)]
  if outside and outside[-1] is not frames[-1]:
    where.append(outside[-1])
  return ' (' + ', called from '.join(
      f'{frame.filename}:{frame.lineno}, in {frame.name}'
      for frame in where) + ')'


def checked(fn: Callable[..., Any],
            errors: frozenset = checkify.user_checks) -> Callable[..., Any]:
  """Wraps `fn` so that its calls check the values they are given.

  For debugging: the checks cost one host sync per call, and the wrapped
  function no longer donates its inputs. Arguments that are arrays or
  pytrees of arrays (states, batches, keys) are traced; all others (`num`,
  `loss`, `num_steps`, None) are passed as they are, and each new
  combination of them compiles anew, as static arguments do under
  `jax.jit`.

  Example::

    train_step = jaxgan.checked(jaxgan.train_step)
    state_g, state_d, metrics = train_step(state_g, state_d, batch, key)

  Args:
    fn: a jaxgan function such as `train_step`, `train_loop`, `sample` or
      `discriminate`, or any function of arrays.
    errors: the checkify error sets to enable; the default checks only the
      conditions jaxgan states (images, labels). `checkify.nan_checks |
      checkify.user_checks` also reports the first operation that makes a
      NaN, `checkify.all_checks` out-of-bounds indexing as well.

  Returns:
    A function of the same arguments and results that raises `JaxganError`
    naming the first failed check and the line of code that made it.
  """
  compiled = {}
  name = getattr(fn, '__name__', type(fn).__name__)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    named = list(enumerate(args)) + list(kwargs.items())
    traced = tuple(arg for arg, value in named if _is_array_tree(value))
    static = tuple((arg, value) for arg, value in named if arg not in traced)
    signature = (len(args), traced, static)
    try:
      function = compiled.get(signature)
    except TypeError as e:
      raise JaxganError(
          f'checked({name}): an argument that is not an array must '
          f'be hashable; got {static}.') from e
    if function is None:
      constants = dict(static)

      def call(traced_values):
        values = {**constants, **dict(zip(traced, traced_values))}
        return fn(*(values[i] for i in range(len(args))),
                  **{key: values[key] for key in kwargs})

      function = compiled[signature] = jax.jit(
          checkify.checkify(call, errors=errors))
    error, result = function(tuple(dict(named)[arg] for arg in traced))
    try:
      error.throw()
    except checkify.JaxRuntimeError as e:
      message = str(e).split('\n')[0].removesuffix(' (`check` failed)')
      raise JaxganError(f'{name}: {message}{_where(e)}') from e
    return result

  return wrapper
