"""glibc malloc tuning for XLA CPU: keep freed temp buffers in the heap instead of unmapping them.

XLA CPU allocates its temp buffer (~0.8 GB for a MobileNetV2 224 px train step) afresh every step.
glibc serves blocks above the mmap threshold with mmap and unmaps them on free, so every step
page-faults all of it again (~45% of the step's CPU time, benchmarks/compare.py). Disabling mmap
and trimming keeps freed pages mapped and reused.
"""
import ctypes
import ctypes.util
import importlib.util
import os
import platform

from absl import logging

# mallopt parameters, as glibc's malloc/malloc.h defines them.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8

_applied = False


def tune_malloc() -> bool:
  """Applies the tuning once per process; True where it applied (Linux with glibc), else False.

  Call it before the first large allocation: M_ARENA_MAX only limits arenas created afterwards.
  The cost: the process keeps its peak heap mapped (freed memory is not returned to the OS).
  """
  global _applied
  if _applied:
    return True
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  name = ctypes.util.find_library('c')
  if name is None:
    return False
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # One arena: every thread's frees return to the heap the next allocation draws from.
  ok = mallopt(M_ARENA_MAX, 1) == 1
  ok &= mallopt(M_MMAP_MAX, 0) == 1  # no mmap'd chunks: large blocks come from the heap
  ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1  # int parameter; ~2 GiB of free top kept
  _applied = bool(ok)
  return _applied


def _cpu_only() -> bool:
  """Whether jax will run on the CPU, decided without initializing a backend (that is too late)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  # GPU plugins install the jax_plugins namespace package; TPUs need libtpu.
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def tune_malloc_on_cpu() -> bool:
  """tune_malloc() where jax will run on the CPU, unless NORMJAX_TUNE_MALLOC=0; logs it.

  Call before jax initializes its backend: XLA's threads create their malloc arenas then, and
  tuning after that measured no effect (213k page faults per full224 step either way).
  """
  if os.environ.get('NORMJAX_TUNE_MALLOC', '1') == '0' or not _cpu_only():
    return False
  applied = tune_malloc()
  if applied:
    logging.info('CPU: glibc malloc keeps freed memory mapped (no per-step page faults of XLA temp '
                 'buffers); NORMJAX_TUNE_MALLOC=0 turns this off')
  return applied
