"""glibc malloc on CPU: transparent huge pages for XLA's buffers, set by re-executing the process.

XLA CPU allocates its temp buffers (~0.8 GB for a MobileNetV2 224 px train step) with malloc afresh
every step. glibc maps blocks that large with mmap and unmaps them on free, so each step
page-faults all of it again, 4 KiB at a time (211k faults per CIFAR-stem train step). With the
tunable glibc.malloc.hugetlb=1, malloc advises transparent huge pages (THP) for what it maps: a
fault then maps 2 MiB. Measured on the development machine (2 cores of an AMD EPYC, family 26,
kernel 6.18, THP in madvise mode), the normjax fp32 CIFAR-stem train step alone ran at 160-179
img/s, against 102-119 untuned (`benchmarks/compare.py`'s docstring).
Tunables are read once, when the process starts, so an entry point re-executes itself with
GLIBC_TUNABLES set before it does anything else.

The mallopt tuning normjax used before (one arena, no mmap, no trim) removed the faults but, on
this machine, made XLA's threads contend for the one arena's lock (9-11k voluntary context
switches per step against 0.6k): 63-100 img/s on the same step, 13.1 against 38.1 img/s at 224 px.
"""
import importlib.util
import os
import pathlib
import platform
import sys
from typing import Mapping

from absl import logging

TUNABLE = 'glibc.malloc.hugetlb=1'  # glibc >= 2.35: madvise(MADV_HUGEPAGE) what malloc maps
OPT_OUT = 'NORMJAX_TUNE_MALLOC'  # '0' leaves malloc as it is
_THP_SETTING = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')


def thp_mode(setting: pathlib.Path = _THP_SETTING) -> str:
  """The kernel's THP mode, 'always' | 'madvise' | 'never' (the bracketed word), '' if unknown."""
  try:
    text = setting.read_text()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else ''


def _cpu_only(environ: Mapping[str, str]) -> bool:
  """Whether jax will run on the CPU, decided without initializing a backend."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  # GPU plugins install the jax_plugins namespace package; TPUs need libtpu.
  return not any(importlib.util.find_spec(name) for name in ('jax_plugins', 'libtpu'))


def _glibc_supports_hugetlb() -> bool:
  if platform.system() != 'Linux':
    return False
  libc, version = platform.libc_ver()
  if libc != 'glibc':
    return False
  try:
    return tuple(int(p) for p in version.split('.')[:2]) >= (2, 35)
  except ValueError:
    return False


def huge_pages_on(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process runs with the tunable (it must have been set when the process started)."""
  return TUNABLE in environ.get('GLIBC_TUNABLES', '').split(':')


def tunables_to_set(environ: Mapping[str, str] = os.environ, mode: str | None = None) -> str | None:
  """The GLIBC_TUNABLES value to re-execute with, or None where it would change nothing.

  None: opted out, not on CPU, not glibc >= 2.35, THP off ('never': madvise is ignored; 'always':
  every mapping gets huge pages already), or already set.
  """
  if environ.get(OPT_OUT, '1') == '0' or huge_pages_on(environ):
    return None
  if (thp_mode() if mode is None else mode) != 'madvise':
    return None
  if not _glibc_supports_hugetlb() or not _cpu_only(environ):
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  return f'{current}:{TUNABLE}' if current else TUNABLE


def reexec_with_huge_pages() -> None:
  """Re-executes this program (same argv, same pid) with the tunable, where it would help.

  Call it first in an entry point's `if __name__ == '__main__':`, never from library code: it
  replaces the running process. NORMJAX_TUNE_MALLOC=0 opts out.
  """
  tunables = tunables_to_set()
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def log_state() -> bool:
  """Logs whether XLA's buffers get huge pages; returns huge_pages_on()."""
  on = huge_pages_on()
  if on:
    logging.info('CPU: glibc malloc advises transparent huge pages (GLIBC_TUNABLES=%s; '
                 '%s=0 turns this off)', TUNABLE, OPT_OUT)
  return on
