r"""Wheels and prepared MNIST for running jaxgan where no package index is.

Accelerator machines often come with jax, flax, optax, orbax-checkpoint and
PyTorch installed but cannot reach PyPI or the MNIST mirrors. Run this where
pip works, in the repository root, then copy `.whl/` and `.data/` along with
the repository; `benchmarks/device_check.sh` installs the wheels it finds in
`.whl/` and reads MNIST from `.data/`.

The wheels are the installed versions (in this environment) of everything
tensorflow-datasets' reading path, array_record and tensorboardX need,
resolved for the target's Python, minus the packages the target already has
(`--present`; by default the usual contents of a CUDA JAX + PyTorch image).
Pure-Python packages published only as source are built into wheels here.

  python benchmarks/offline_bundle.py --python_version=3.12 \
      --mnist_dir=../shared/datasets/mnist
"""

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What jaxgan needs beyond jax, flax, optax and orbax-checkpoint.
ROOTS = ('tensorflow-datasets', 'array-record', 'tensorboardX',
         'importlib_resources')
# Found on CUDA images that hold JAX and PyTorch; left out of the bundle.
PRESENT = ('absl-py', 'attrs', 'certifi', 'charset-normalizer', 'einops',
           'etils', 'fsspec', 'idna', 'matplotlib', 'numpy', 'packaging',
           'pillow', 'protobuf', 'psutil', 'pyarrow', 'requests', 'six',
           'tqdm', 'typing-extensions', 'urllib3', 'wrapt', 'zipp')
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64',
             'manylinux_2_17_x86_64', 'manylinux2014_x86_64',
             'manylinux1_x86_64')


def closure(roots, python_version: str) -> dict[str, str]:
  """`{canonical name: installed version}` of `roots` and their requirements.

  Requirements are followed with their markers evaluated for a Linux x86-64
  CPython of `python_version`, extras included where a requirement asks for
  them. Every package must be installed in this environment.
  """
  environment = {'python_version': python_version,
                 'python_full_version': f'{python_version}.0',
                 'sys_platform': 'linux', 'platform_system': 'Linux',
                 'platform_machine': 'x86_64', 'os_name': 'posix',
                 'implementation_name': 'cpython',
                 'platform_python_implementation': 'CPython'}
  found: dict[str, str] = {}
  visited: set[tuple[str, tuple[str, ...]]] = set()

  def visit(name: str, extras: tuple[str, ...]):
    key = canonicalize_name(name)
    if (key, extras) in visited:
      return
    visited.add((key, extras))
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      raise SystemExit(f'{name} is needed but not installed here; install '
                       'jaxgan (pip install -e .) first.') from None
    found[key] = dist.version
    for line in dist.requires or []:
      requirement = Requirement(line)
      wanted = requirement.marker is None or any(
          requirement.marker.evaluate({**environment, 'extra': extra})
          for extra in ('',) + extras)
      if wanted:
        visit(requirement.name, tuple(sorted(requirement.extras)))

  for root in roots:
    visit(root, ())
  return found


def download_command(spec: str, python_version: str, out: str) -> list[str]:
  """`pip download` of `spec`'s wheel for a Linux x86-64 CPython target."""
  platforms = [arg for platform in PLATFORMS
               for arg in ('--platform', platform)]
  return [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps',
          '--only-binary=:all:', '--python-version', python_version,
          '--implementation', 'cp', *platforms, '-d', out, spec]


def fetch(name: str, version: str, python_version: str, out: str) -> None:
  """Downloads the wheel of `name==version` for the target, or builds one.

  Only a source distribution that builds into a pure-Python wheel
  (`py3-none-any`) is accepted: one with compiled parts would be built for
  this machine's Python, not the target's.
  """
  spec = f'{name}=={version}'
  if subprocess.run(download_command(spec, python_version, out),
                    capture_output=True).returncode == 0:
    return
  with tempfile.TemporaryDirectory() as build_dir:
    result = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q',
                             '--no-deps', '-w', build_dir, spec],
                            capture_output=True, text=True)
    built = os.listdir(build_dir) if result.returncode == 0 else []
    if len(built) != 1 or not built[0].endswith('-none-any.whl'):
      raise SystemExit(
          f'No wheel of {spec} for Python {python_version} on the index, and '
          f'its source does not build into a pure-Python wheel '
          f'({built or result.stderr[-2000:]}).')
    shutil.move(os.path.join(build_dir, built[0]), out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--python_version', default='3.12',
                      help="the target machine's Python, e.g. 3.12")
  parser.add_argument('--present', default=','.join(PRESENT),
                      help='comma-separated packages the target already has')
  parser.add_argument('--wheel_dir', default='.whl')
  parser.add_argument('--data_dir', default='.data',
                      help='where MNIST is prepared (a tfds data dir)')
  parser.add_argument('--mnist_dir', default=None,
                      help="folder with MNIST's four original .gz files "
                           "(default: tfds downloads them)")
  args = parser.parse_args()

  present = {canonicalize_name(n) for n in args.present.split(',') if n}
  needed = {name: version for name, version in
            closure(ROOTS, args.python_version).items()
            if name not in present}
  os.makedirs(args.wheel_dir, exist_ok=True)
  for name, version in sorted(needed.items()):
    fetch(name, version, args.python_version, args.wheel_dir)
  wheels = sorted(f for f in os.listdir(args.wheel_dir) if f.endswith('.whl'))
  size = sum(os.path.getsize(os.path.join(args.wheel_dir, f)) for f in wheels)
  print(f'{len(wheels)} wheels, {size / 2**20:.1f} MiB, in {args.wheel_dir}: '
        + ', '.join(wheels))

  import jaxgan  # pylint: disable=g-import-not-at-top
  # Prepared only: the decoded arrays that jaxgan caches on a first read
  # would add 55 MiB, and the target rebuilds them in seconds.
  downloads = os.path.join(args.data_dir, 'downloads')
  had_downloads = os.path.exists(downloads)
  jaxgan.prepare_mnist(args.data_dir, args.mnist_dir)
  if not had_downloads:  # The files tfds extracted on the way (53 MiB).
    shutil.rmtree(downloads, ignore_errors=True)
  size = sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(args.data_dir) for f in files)
  print(f'MNIST prepared in {args.data_dir} ({size / 2**20:.1f} MiB)')


if __name__ == '__main__':
  main()
