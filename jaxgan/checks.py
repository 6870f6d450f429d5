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
import warnings
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
  """States that float images are finite and in [-1, 1].

  Args:
    images: float images `[B, H, W, C]`.
  """
  # The message's reductions have no value for an empty batch, which is in
  # range anyway; the shape is static, so this costs nothing when traced.
  if images.size == 0:
    return
  checkify.debug_check(
      jnp.all(jnp.abs(images) <= 1.0 + IMAGE_RANGE_TOLERANCE),
      'Float images must be finite and in [-1, 1] (uint8 images are '
      'rescaled from [0, 255]); got values from {} to {}, {} of them NaN. '
      'Map [0, 1] images with 2 * x - 1, or pass uint8.',
      jnp.nanmin(images), jnp.nanmax(images), jnp.sum(jnp.isnan(images)))


def label_range(labels: jax.Array, num_classes: int, who: str) -> None:
  """States that class labels lie in [0, num_classes).

  Args:
    labels: int labels `[B]`.
    num_classes: the number of classes.
    who: the network the labels are for, as the message names it
      ('Generator', 'Discriminator').
  """
  if labels.size == 0:
    return
  checkify.debug_check(
      jnp.all((labels >= 0) & (labels < num_classes)),
      f'{who} labels must lie in [0, {num_classes}); got labels from {{}} '
      'to {}.', jnp.min(labels), jnp.max(labels))


def _is_traced(leaf: Any) -> bool:
  # NumPy scalars stay static: under `jax.jit` they can be hashable static
  # arguments (`static_argnums`) and fields of static pytrees such as
  # `Penalty(weight=np.float32(10.0))`, which tracing would break.
  return isinstance(leaf, (jax.Array, np.ndarray))


def _static_key(leaf: Any) -> Any:
  """A cache key for a compiled-in leaf that tells apart values that are
  equal in Python but compile differently."""
  # The type, since 1, 1.0 and True are equal as keys; the bits of a float,
  # since 0.0 == -0.0 and NaN equals nothing; a NumPy scalar's dtype, since
  # its bits alone leave out units (datetime64) and field names.
  if isinstance(leaf, np.generic):
    return type(leaf), leaf.dtype, leaf.tobytes()
  if isinstance(leaf, float):
    return type(leaf), leaf.hex()
  if isinstance(leaf, complex):
    return type(leaf), leaf.real.hex(), leaf.imag.hex()
  return type(leaf), leaf


# Compiled programs of one checked function past which it warns: a number
# that changes per call is then most likely compiled in.
_MANY_PROGRAMS = 8


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


def _name(fn: Callable[..., Any]) -> str:
  """The name errors give `fn` by: its own, or that of the function it
  partially applies."""
  name = getattr(fn, '__name__', None)
  if name is None and hasattr(fn, 'func'):
    name = f'partial({_name(fn.func)})'
  return name or type(fn).__name__


def checked(fn: Callable[..., Any],
            errors: frozenset = checkify.user_checks) -> Callable[..., Any]:
  """Wraps `fn` so that its calls check the values they are given.

  For debugging: the checks cost one host sync per call, and the wrapped
  function no longer donates its inputs. Arguments are split into pytree
  leaves: array leaves (`jax.Array` and NumPy arrays: states, batches,
  keys) are traced; all other leaves (Python and NumPy scalars such as
  `num` or `num_steps`, strings, `loss`) are compiled in, and each new
  combination of them compiles anew, as static arguments do under
  `jax.jit` (NumPy scalars included, which `jax.jit` traces unless they
  are static). Pass a number that changes per call (`discriminator_loop`'s
  `first_step`) as an array, `jnp.int32(...)`; a checked function that has
  compiled 8 programs warns, naming the arguments that changed.

  Example::

    train_step = jaxgan.checked(jaxgan.train_step)
    state_g, state_d, metrics = train_step(state_g, state_d, batch, key)

  Args:
    fn: a jaxgan function such as `train_step`, `train_loop`, `sample` or
      `discriminate`, or any function of arrays. The checked function is
      called by itself, not inside `jax.jit`, `vmap` or `grad`: checks
      raise on the host, which a traced function cannot do.
    errors: the checkify error sets to enable; the default checks only the
      conditions jaxgan states (images, labels).
      `checkify.nan_checks | checkify.user_checks` also reports the first
      operation that makes a NaN (not an infinity), `checkify.all_checks`
      out-of-bounds indexing and division by zero as well.

  Returns:
    A function of the same arguments that raises `JaxganError` naming the
    first failed check and the line of code that made it. Its results are
    `fn`'s (the tests compare them bit for bit with the default `errors`);
    more error sets add checks that change how XLA fuses the program, so
    float results may then differ in the last bits.
  """
  compiled = {}
  name = _name(fn)

  def refuse_if_traced(values):
    if any(isinstance(leaf, jax.core.Tracer)
           for leaf in jax.tree.leaves(values)):
      raise JaxganError(
          f'checked({name}) was called inside a traced function (jax.jit, '
          'vmap, grad, scan), where a failed check cannot raise. Call it '
          'outside: checked(jax.jit(f)) rather than jax.jit(checked(f)).')

  # `updated=()`: `fn.__dict__` may hold attributes of a jitted function
  # (`lower`, `trace`) that would not describe the wrapper.
  @functools.wraps(fn, updated=())
  def wrapper(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    refuse_if_traced(leaves)
    is_traced = tuple(_is_traced(leaf) for leaf in leaves)
    static = tuple(_static_key(leaf)
                   for leaf, traced in zip(leaves, is_traced) if not traced)
    signature = (treedef, is_traced, static)
    try:
      function = compiled.get(signature)
    except TypeError as e:
      kinds = sorted({type(leaf).__name__
                      for leaf, traced in zip(leaves, is_traced)
                      if not traced and not _is_hashable(leaf)})
      raise JaxganError(
          f'checked({name}): arguments that are not arrays are compiled '
          f'in and must be hashable; got {", ".join(kinds)}. Pass an '
          'array, or a hashable value such as a tuple.') from e
    if function is None:
      template = [None if traced else leaf
                  for leaf, traced in zip(leaves, is_traced)]

      def call(traced_leaves):
        given = iter(traced_leaves)
        call_args, call_kwargs = jax.tree.unflatten(
            treedef, [next(given) if traced else leaf
                      for leaf, traced in zip(template, is_traced)])
        return fn(*call_args, **call_kwargs)

      function = compiled[signature] = jax.jit(
          checkify.checkify(call, errors=errors))
      if len(compiled) == _MANY_PROGRAMS:
        warnings.warn(
            f'checked({name}) has compiled {_MANY_PROGRAMS} programs, one '
            'for each new combination of the arguments that are not '
            f'arrays{_changed(compiled, args, kwargs)}. Pass numbers that '
            'change per call as arrays, such as jnp.int32(step).',
            stacklevel=2)
    error, result = function(
        [leaf for leaf, traced in zip(leaves, is_traced) if traced])
    # Arrays that `fn` closes over can be traced even when no argument is.
    refuse_if_traced((error, result))
    try:
      error.throw()
    except checkify.JaxRuntimeError as e:
      message = str(e).removesuffix(' (`check` failed)')
      raise JaxganError(f'{name}: {message}{_where(e)}') from e
    return result

  return wrapper


def _changed(compiled: dict, args: tuple, kwargs: dict) -> str:
  """' (changed: args[1]=2.0, ...)' for the compiled-in leaves of this call
  that differ from those of the first compiled program."""
  (*first_kind, first), *_, (*kind, last) = compiled
  if kind != first_kind:
    return ' (their structure changed)'
  paths = [f'args{jax.tree_util.keystr(path)}' for path, _ in
           jax.tree_util.tree_flatten_with_path(args)[0]]
  paths += [f'kwargs{jax.tree_util.keystr(path)}' for path, _ in
            jax.tree_util.tree_flatten_with_path(kwargs)[0]]
  is_traced = kind[1]
  leaves = jax.tree.leaves((args, kwargs))
  static = [(path, leaf) for path, leaf, traced in
            zip(paths, leaves, is_traced) if not traced]
  changed = [f'{path}={leaf!r}' for (path, leaf), old, new
             in zip(static, first, last) if old != new]
  return f' (changed: {", ".join(changed[:4])})' if changed else ''


def _is_hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True
