"""`jaxgan.checked`: value checks that are free when off and raise when on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxgan
from conftest import copy_tree
from conftest import leaves_equal


@pytest.fixture(scope='module')
def conditional():
  config = jaxgan.DCGANConfig(batch_size=8, conditional=True)
  images = jax.random.uniform(jax.random.key(1), (32, 28, 28, 1),
                              minval=-1.0, maxval=1.0)
  labels = jnp.arange(32, dtype=jnp.int32) % 10
  return config.create_train_states(jax.random.key(0)), (images, labels)


def test_checked_step_equals_the_step_and_rejects_bad_images(
    states, real_batch):
  step = jaxgan.checked(jaxgan.train_step)
  key = jax.random.key(3)
  ref = jaxgan.train_step(*copy_tree(states), real_batch, key)
  out = step(*states, real_batch, key)
  assert leaves_equal(out, ref)

  with pytest.raises(jaxgan.JaxganError,
                     match=r'train_step: Float images must be finite and in '
                           r'\[-1, 1\].*from 0.0 to 255.0, 0 of them NaN.*'
                           r'2 \* x - 1'):
    step(*states, jnp.round((real_batch + 1) * 127.5), key)
  with pytest.raises(jaxgan.JaxganError, match='1 of them NaN'):
    step(*states, real_batch.at[5, 3, 3, 0].set(jnp.nan), key)
  # The inputs are not donated: the states are still there after an error.
  assert leaves_equal(states, copy_tree(states))
  assert int(states[0].step) == 0

  # Unchecked, the same step runs on those images without a word.
  _, _, metrics = jaxgan.train_step(*copy_tree(states), real_batch * 2, key)
  assert np.isfinite(float(metrics['d_loss']))


def test_checks_leave_the_compiled_program():
  images = jnp.linspace(-1, 1, 2 * 28 * 28).reshape(2, 28, 28, 1)
  hlo = jax.jit(jaxgan.to_float_images).lower(images).compile().as_text()
  # The check's reductions (all, min, max, NaN count) are dropped by XLA.
  assert ' reduce(' not in hlo
  checked_hlo = jax.jit(checkify.checkify(
      jaxgan.to_float_images, errors=checkify.user_checks)).lower(
          images).compile().as_text()
  assert ' reduce(' in checked_hlo


def test_checked_loop_finds_a_bad_label_anywhere_in_the_dataset(conditional):
  (state_g, state_d), (images, labels) = conditional
  loop = jaxgan.checked(jaxgan.train_loop)
  key = jax.random.key(4)
  out = loop(state_g, state_d, (images, labels), key, num_steps=4,
             batch_size=8)
  ref = jaxgan.train_loop(*copy_tree((state_g, state_d)), (images, labels),
                          key, num_steps=4, batch_size=8)
  assert leaves_equal(out, ref)

  with pytest.raises(jaxgan.JaxganError,
                     match=r'train_loop: Discriminator labels must lie in '
                           r'\[0, 10\); got labels from 0 to 10\.'):
    loop(state_g, state_d, (images, labels.at[29].set(10)), key,
         num_steps=4, batch_size=8)


def test_checked_sample_and_discriminate(conditional):
  (state_g, state_d), (images, labels) = conditional
  sample = jaxgan.checked(jaxgan.sample)
  key = jax.random.key(5)
  given = jnp.array([0, 9, 3, 3], jnp.int32)
  np.testing.assert_array_equal(
      sample(state_g, key, 4, labels=given),
      jaxgan.sample(state_g, key, 4, labels=given))
  # Static arguments may come by position or by keyword.
  assert sample(state_g, key, num=4).shape == (4, 28, 28, 1)
  with pytest.raises(jaxgan.JaxganError,
                     match=r'Generator labels must lie in \[0, 10\); got '
                           r'labels from -1 to 3'):
    sample(state_g, key, 4, labels=given.at[1].set(-1))

  discriminate = jaxgan.checked(jaxgan.discriminate)
  np.testing.assert_array_equal(
      discriminate(state_d, images[:8], labels[:8]),
      jaxgan.discriminate(state_d, images[:8], labels[:8]))
  with pytest.raises(jaxgan.JaxganError, match='Float images'):
    discriminate(state_d, images[:8] - 1.5, labels[:8])
  # uint8 images are in range by construction.
  assert discriminate(state_d, jnp.full((8, 28, 28, 1), 255, jnp.uint8),
                      labels[:8]).shape == (8,)


def test_checked_with_more_error_sets_and_unhashable_arguments():
  log = jaxgan.checked(jnp.log, errors=checkify.nan_checks)
  assert float(log(jnp.float32(1.0))) == 0.0
  with pytest.raises(jaxgan.JaxganError, match='log: .*nan'):
    log(jnp.float32(-1.0))

  def scale(x, factors):
    return x * factors[0]

  with pytest.raises(jaxgan.JaxganError, match='must be hashable'):
    jaxgan.checked(scale)(jnp.ones(2), [2.0])
