"""normjax's C++ CPU kernels (normjax/csrc), built on first use and registered as XLA FFI targets.

XLA CPU has no fast depthwise convolution (normjax/models/depthwise.py), so normjax ships one in
C++. The first process that needs it compiles normjax/csrc/*.cc with the system C++ compiler
($CXX, else c++) against jaxlib's FFI headers, for this CPU (-march=native), into
$NORMJAX_NATIVE_DIR or ~/.cache/normjax/native/<digest>/; the digest covers the sources, the
flags, the compiler, jaxlib's version and the CPU, so a change to any of them builds anew, and
every later process loads the cached library. Where no compiler or no FFI is available, `load`
logs why once and returns False, and callers use their XLA formulation instead. NORMJAX_NATIVE=0
turns the kernels off (to compare against XLA's formulation).
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
from absl import logging

OPT_OUT = 'NORMJAX_NATIVE'  # '0': XLA's formulations only
_OFF = "normjax's C++ CPU kernels are off (slower depthwise convolutions on CPU)"
SOURCES = (pathlib.Path(__file__).parent / 'csrc' / 'depthwise.cc',)
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
# FFI target name -> the handler symbol in the library.
TARGETS = {
    'normjax_depthwise_forward': 'NormjaxDepthwiseForward',
    'normjax_depthwise_input_grad': 'NormjaxDepthwiseInputGrad',
    'normjax_depthwise_kernel_grad': 'NormjaxDepthwiseKernelGrad',
}


def _cache_root() -> pathlib.Path:
  env = os.environ.get('NORMJAX_NATIVE_DIR')
  return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'normjax' / 'native'


def _cpu_signature() -> str:
  """The CPU model and feature flags that -march=native compiles for."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return platform.processor()
  return '\n'.join(sorted({line for line in lines if line.startswith(('model name', 'flags'))}))


def build(compiler: str, directory: pathlib.Path | None = None) -> pathlib.Path:
  """The shared library of SOURCES, compiled unless a build with the same digest exists.

  Raises:
    RuntimeError: the compiler failed; the message holds its command and output.
  """
  import jaxlib  # pylint: disable=g-import-not-at-top
  include = jax.ffi.include_dir()
  digest = hashlib.sha256()
  for part in (*[s.read_bytes() for s in SOURCES], ' '.join(FLAGS).encode(), compiler.encode(),
               jaxlib.__version__.encode(), _cpu_signature().encode()):
    digest.update(hashlib.sha256(part).digest())
  directory = (directory or _cache_root()) / digest.hexdigest()[:20]
  library = directory / 'libnormjax_cpu.so'
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  # Written under a temporary name and renamed: concurrent builds never load a partial file.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=directory)
  os.close(fd)
  command = [compiler, *FLAGS, f'-I{include}', *map(str, SOURCES), '-o', partial]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    os.unlink(partial)
    raise RuntimeError(f'building normjax\'s CPU kernels failed: {" ".join(command)}\n'
                       f'{result.stderr[-2000:]}')
  os.replace(partial, library)
  return library


@functools.cache
def load() -> bool:
  """Builds (once per machine) and registers the FFI targets; False where they cannot be."""
  if os.environ.get(OPT_OUT, '1') == '0':
    logging.info('%s=0: normjax\'s C++ CPU kernels are off', OPT_OUT)
    return False
  compiler = os.environ.get('CXX', 'c++')
  if not hasattr(jax, 'ffi') or not hasattr(jax.ffi, 'include_dir'):
    logging.warning('this jax has no jax.ffi: %s', _OFF)
    return False
  if shutil.which(compiler) is None:
    logging.warning('no C++ compiler (%s; set $CXX): %s', compiler, _OFF)
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (RuntimeError, OSError) as e:
    logging.warning('%s\n%s', e, _OFF)
    return False
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  return True
