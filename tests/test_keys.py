"""Every random draw of the step, the loop and `sample` has a key of its own.

A JAX key is either drawn from (`random_bits`) or split, once, or only
folded with distinct data. Anything else reuses randomness: `split(key)[i]`
is `fold_in(key, i)`, and with threefry the values drawn from `key` share
their threefry evaluations with `fold_in(key, i)` (element i's bits are the
XOR of that subkey's two words). `key_misuse` checks this on a jaxpr.
"""

import collections
import functools
import itertools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgan
from conftest import load_example

_DRAW, _SPLIT, _FOLD = 'random_bits', 'random_split', 'random_fold_in'


def _is_key(var) -> bool:
  return (hasattr(var, 'aval') and hasattr(var.aval, 'dtype')
          and jax.dtypes.issubdtype(var.aval.dtype, jax.dtypes.prng_key))


def _sub_jaxprs(eqn):
  """(jaxpr, the eqn's vars its invars stand for, loop-constant count)."""
  params, invars = eqn.params, list(eqn.invars)
  name = eqn.primitive.name
  if name == 'while':
    cond_n, body_n = params['cond_nconsts'], params['body_nconsts']
    carry = invars[cond_n + body_n:]
    return [(params['cond_jaxpr'].jaxpr, invars[:cond_n] + carry, cond_n),
            (params['body_jaxpr'].jaxpr,
             invars[cond_n:cond_n + body_n] + carry, body_n)]
  if name == 'cond':
    # Alternatives, checked together: a false alarm at worst.
    return [(branch.jaxpr, invars[1:], 0) for branch in params['branches']]
  loop_consts = params['num_consts'] if name == 'scan' else 0
  subs = []
  for value in params.values():
    for sub in value if isinstance(value, (tuple, list)) else (value,):
      jaxpr = getattr(sub, 'jaxpr', sub)
      if isinstance(jaxpr, jex.Jaxpr):
        if len(jaxpr.invars) == len(invars):
          subs.append((jaxpr, invars, loop_consts))
        elif any(_is_key(v) for v in invars):
          raise NotImplementedError(f'keys into {name}: unknown binding')
  return subs


def _collect(jaxpr, uses, alias, looped, calls=itertools.count()):
  """Adds each key's uses to `uses[root]`, following sub-jaxprs.

  A key's root is `(call, var)` where it was made: a sub-jaxpr called twice
  (jax caches them) makes new keys in each call.
  """
  call = next(calls)
  root = lambda var: alias.get(var, (call, var))
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in (_DRAW, _SPLIT, _FOLD):
      data = eqn.invars[1] if name == _FOLD else None
      data = (int(np.asarray(data.val)) if isinstance(data, jex.Literal)
              else None)
      key = root(eqn.invars[0])
      uses[key].append((name, data, key in looped))
      continue
    for sub, outer_vars, num_loop_consts in _sub_jaxprs(eqn):
      inner_alias, inner_looped = {}, set(looped)
      for i, (inner, outer) in enumerate(zip(sub.invars, outer_vars)):
        if _is_key(inner) and not isinstance(outer, jex.Literal):
          inner_alias[inner] = root(outer)
          if i < num_loop_consts:
            inner_looped.add(root(outer))
      _collect(sub, uses, inner_alias, inner_looped)
    # Keys out of other ops (the slices of a split) count as new keys.


def key_misuse(closed_jaxpr) -> tuple[list[str], int]:
  """Ways `closed_jaxpr` reuses a key, and how many draws it makes."""
  uses = collections.defaultdict(list)
  _collect(closed_jaxpr.jaxpr, uses, {}, set())
  problems, draws = [], 0
  for (_, var), var_uses in uses.items():
    kinds = collections.Counter(kind for kind, _, _ in var_uses)
    draws += kinds[_DRAW]
    consumed = kinds[_DRAW] + kinds[_SPLIT]
    if consumed > 1:
      problems.append(f'{var} is drawn from or split {consumed} times')
    if consumed and kinds[_FOLD]:
      problems.append(f'{var} is drawn from or split and also folded')
    folded = [data for kind, data, _ in var_uses
              if kind == _FOLD and data is not None]
    repeated = sorted({d for d in folded if folded.count(d) > 1})
    if repeated:
      problems.append(f'{var} is folded with {repeated} more than once')
    if any(looped and (kind != _FOLD or data is not None)
           for kind, data, looped in var_uses):
      problems.append(f'{var} gives the same key or values every iteration')
  return problems, draws


def _misuse(fn, *args):
  return key_misuse(jax.make_jaxpr(fn)(*args))


def test_the_check_finds_each_kind_of_reuse():
  key = jax.random.key(0)

  def drawn_and_folded(key):  # The step's old pattern: noise, then labels.
    return (jax.random.uniform(key, (4, 3)),
            jax.random.randint(jax.random.fold_in(key, 7), (4,), 0, 10))

  def split_and_folded(key):
    return jax.random.split(key)[1], jax.random.fold_in(key, 1)

  def drawn_in_a_loop(key):
    return jax.lax.scan(lambda c, _: (c + jax.random.uniform(key), None),
                        0.0, jnp.arange(3))[0]

  def folded_twice(key):
    return jax.random.fold_in(key, 2), jax.random.fold_in(key, 2)

  # The collisions are real: element 7's bits are fold_in(key, 7)'s words.
  words = jax.random.key_data(jax.random.fold_in(key, 7))
  assert jax.random.bits(key, (8,))[7] == words[0] ^ words[1]
  for fn, message in ((drawn_and_folded, 'also folded'),
                      (split_and_folded, 'also folded'),
                      (lambda k: (jax.random.normal(k), jax.random.normal(k)),
                       'split 2 times'),
                      (drawn_in_a_loop, 'every iteration'),
                      (folded_twice, 'with [2] more than once')):
    problems, _ = _misuse(fn, key)
    assert len(problems) == 1 and message in problems[0], problems

  def clean(key):
    noise_key, label_key = jax.random.split(jax.random.fold_in(key, 0))
    step_key = jax.random.fold_in(key, 1)
    per_step = jax.lax.scan(
        lambda c, s: (c, jax.random.uniform(jax.random.fold_in(step_key, s))),
        0.0, jnp.arange(3))[1]
    return (jax.random.uniform(noise_key), jax.random.normal(label_key),
            per_step)

  problems, draws = _misuse(clean, jax.random.key(1))
  assert problems == [] and draws == 3


@pytest.fixture(scope='module')
def conditional_states():
  config = jaxgan.DCGANConfig(batch_size=8, conditional=True, n_critic=2,
                              loss='wasserstein', penalty='gradient_penalty',
                              discriminator_batch_norm=False)
  return config, config.create_train_states(jax.random.key(0))


def _batch(num, conditional):
  images = jnp.zeros((num, 28, 28, 1), jnp.uint8)
  return (images, jnp.arange(num) % 10) if conditional else images


def test_the_step_gives_each_draw_its_own_key(states, conditional_states):
  key = jax.random.key(3)
  problems, draws = _misuse(jaxgan.train_step, *states, _batch(8, False), key)
  assert problems == [] and draws == 1  # The noise.
  config, conditional = conditional_states
  loss = config.gan_loss()
  problems, draws = _misuse(functools.partial(jaxgan.train_step, loss=loss),
                            *conditional, _batch(16, True), key)
  # Two generated batches' noise (1 draw each) and labels (randint draws
  # twice), two penalties' interpolation weights.
  assert problems == [] and draws == 8
  problems, draws = _misuse(
      functools.partial(jaxgan.discriminator_step, loss=loss), *conditional,
      _batch(8, True), key)
  assert problems == [] and draws == 4


def test_the_loop_and_sample_give_each_draw_its_own_key(conditional_states):
  config, (g, d) = conditional_states
  loop = functools.partial(jaxgan.train_loop, num_steps=3, batch_size=16,
                           loss=config.gan_loss())
  problems, draws = _misuse(loop, g, d, _batch(32, True), jax.random.key(1))
  # Per step as above, and the epoch's shuffle.
  assert problems == [] and draws > 8
  problems, draws = _misuse(functools.partial(jaxgan.sample, num=5), g,
                            jax.random.key(2))
  assert problems == [] and draws == 3
  problems, draws = _misuse(functools.partial(jaxgan.sample_seeds, num=5),
                            jaxgan.stack_seeds([g, g]), jax.random.key(2))
  assert problems == [] and draws == 3


def test_noise_and_labels_come_from_one_key_the_same_with_or_without_labels(
    conditional_states):
  _, (g, _) = conditional_states
  key = jax.random.key(4)
  noise, labels = jaxgan.generator_inputs(key, 6, 100, 10)
  assert noise.shape == (6, 100) and labels.shape == (6,)
  assert labels.dtype == jnp.int32 and 0 <= labels.min() <= labels.max() < 10
  assert float(noise.min()) >= -1 and float(noise.max()) <= 1
  given = jnp.array([3, 1, 4, 1, 5, 9])
  np.testing.assert_allclose(
      jaxgan.sample(g, key, 6, given),
      jaxgan.generate(g, noise, given), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      jaxgan.sample(g, key, 6), jaxgan.generate(g, noise, labels),
      rtol=1e-6, atol=1e-6)
  unconditional_noise, none = jaxgan.generator_inputs(key, 6, 100)
  assert none is None
  np.testing.assert_array_equal(unconditional_noise, noise)


def test_the_examples_rollbacks_draw_keys_no_earlier_loop_used():
  example = load_example()
  # pylint: disable=protected-access
  for run_key in (jax.random.key(0), jax.vmap(jax.random.key)(jnp.arange(2))):
    seen = []
    for rollbacks in range(4):
      loop_key = example._loop_key(run_key, example._TRAIN,
                                   {'rollbacks': rollbacks})
      for key in loop_key.reshape(-1):
        shuffle_key, step_key = jaxgan.loop_keys(key)
        seen += [key, shuffle_key, step_key]
        seen += [jax.random.fold_in(step_key, s) for s in range(4)]
    words = {tuple(np.asarray(jax.random.key_data(k))) for k in seen}
    assert len(words) == len(seen)
