"""Shared fixtures: small models and states, and the real MNIST prepared once."""

import importlib.util
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.environ.get(
    'JAXGAN_MNIST_DIR', os.path.join(REPO, '..', 'shared', 'datasets', 'mnist'))


EXAMPLE = os.path.join(REPO, 'examples', 'mnist_dcgan.py')

_CACHE_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
_OWN_CACHE = []


def pytest_configure(config):
  """One persistent XLA compilation cache for the session and its example
  subprocesses, which compile the same programs many times over.

  A cache of the caller's own (JAX_COMPILATION_CACHE_DIR) is used as is;
  otherwise a fresh one is made and removed at the end, so no session sees
  programs compiled by an earlier one.
  """
  del config
  # Parallel test processes on one GPU would each take 75% of its memory.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if not os.environ.get(_CACHE_VARIABLE):
    _OWN_CACHE.append(tempfile.mkdtemp(prefix='jaxgan-xla-cache-'))
    os.environ[_CACHE_VARIABLE] = _OWN_CACHE[0]
  jax.config.update('jax_compilation_cache_dir', os.environ[_CACHE_VARIABLE])


def pytest_unconfigure(config):
  del config
  for directory in _OWN_CACHE:
    shutil.rmtree(directory, ignore_errors=True)


def load_example():
  """examples/mnist_dcgan.py as a module, loaded once per process: its
  flags can be defined only once."""
  name = 'mnist_dcgan_example'
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


def example_command(flags, prelude: str = '') -> list[str]:
  """argv running the example with `flags` after executing `prelude`."""
  argv = [EXAMPLE, *flags]
  code = (f'{prelude}\nimport runpy, sys\nsys.argv = {argv!r}\n'
          f'runpy.run_path({EXAMPLE!r}, run_name="__main__")')
  return [sys.executable, '-c', code]


def make_states(seed: int = 0, optimizer=None, **generator_fields):
  """Fresh default-model states; each call builds new, undonated buffers."""
  optimizer = optimizer or jaxgan.adam()
  return jaxgan.create_train_states(
      jax.random.key(seed), jaxgan.Generator(**generator_fields),
      jaxgan.Discriminator(), optimizer, optimizer)


def copy_tree(tree):
  """A copy whose buffers survive donation of the original."""
  return jax.tree.map(jnp.copy, tree)


def leaves_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      bool(jnp.array_equal(x, y)) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope='session')
def states():
  """A pristine (state_g, state_d); tests must copy before donating."""
  return make_states()


@pytest.fixture(scope='session')
def sgd_states():
  """States with plain SGD (lr 1), whose updates are exactly the gradients.

  Adam turns the float noise of gradients that are zero in exact arithmetic
  (biases in front of BatchNorm) into full-size updates, so comparisons of
  two computations of the same step use these.
  """
  return make_states(optimizer=optax.sgd(1.0))


@pytest.fixture(scope='session')
def real_batch():
  return jax.random.uniform(jax.random.key(42), (64, 28, 28, 1),
                            minval=-1.0, maxval=1.0)


@pytest.fixture(scope='session')
def mnist_data_dir(tmp_path_factory):
  """A tfds data dir with MNIST prepared offline from the original files."""
  files_present = all(os.path.isfile(os.path.join(MNIST_DIR, f))
                      for f in jaxgan.data.MNIST_FILES)
  if not files_present:
    if os.environ.get('JAXGAN_REQUIRE_MNIST'):
      pytest.fail(f'JAXGAN_REQUIRE_MNIST is set but {MNIST_DIR} lacks the '
                  'MNIST files.')
    pytest.skip(f'no MNIST files in {MNIST_DIR} (set JAXGAN_MNIST_DIR)')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  jaxgan.data.prepare_mnist(data_dir, MNIST_DIR)
  return data_dir
