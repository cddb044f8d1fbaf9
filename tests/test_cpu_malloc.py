"""normjax.cpu_malloc: the huge-page tunable cuts malloc's page faults; entry points re-exec with it."""
import json
import os
import pathlib
import subprocess
import sys

from normjax import cpu_malloc

_ROOT = pathlib.Path(__file__).resolve().parent.parent

# malloc (as XLA CPU does, not numpy, which madvises huge pages itself), touch and free 256 MiB, twice.
_CYCLE = """
import ctypes, json, resource
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(256 << 20)
  ctypes.memset(block, 1, 256 << 20)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""

# Prints its pid, tunables and argv, then calls the entry points' re-exec.
_ENTRY = """
import json, os, sys
from normjax import startup
print(json.dumps([os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:]]), flush=True)
startup.reexec_for_cpu()
"""


def _env(**changes: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', cpu_malloc.OPT_OUT)}
  env.update({k: v for k, v in changes.items() if v is not None})
  env['JAX_PLATFORMS'] = env.get('JAX_PLATFORMS', 'cpu')
  return env


def _run(code: str, env: dict, *args: str) -> list:
  out = subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True,
                       check=True, timeout=60, cwd=_ROOT, env=env).stdout
  return [json.loads(line) for line in out.splitlines()]


def test_huge_page_tunable_cuts_the_faults_of_a_freed_and_reallocated_block():
  mode = cpu_malloc.thp_mode()
  assert mode in ('madvise', 'always'), f'these tests need transparent huge pages, got {mode!r}'
  [plain] = _run(_CYCLE, _env())
  [huge] = _run(_CYCLE, _env(GLIBC_TUNABLES=cpu_malloc.TUNABLE))
  # 256 MiB is 128 huge pages; 4 KiB pages would be 65,536 faults.
  assert huge[1] < 2_000, huge
  if mode == 'madvise':  # 'always' gives the untuned block huge pages too
    assert plain[1] > 60_000, plain  # glibc unmapped the block and faults it in again, 4 KiB at a time


def test_entry_point_reexecutes_itself_once_with_the_tunable_same_pid_and_argv():
  assert cpu_malloc.thp_mode() == 'madvise'  # the development and CI machines' kernel setting
  first, second = _run(_ENTRY, _env(), 'a', 'b c')
  assert first[1] == '' and second[1] == cpu_malloc.TUNABLE
  assert first[0] == second[0] and first[2] == second[2] == ['a', 'b c']
  # Other tunables the user set are kept.
  _, kept = _run(_ENTRY, _env(GLIBC_TUNABLES='glibc.malloc.trim_threshold=1234'))
  assert kept[1] == f'glibc.malloc.trim_threshold=1234:{cpu_malloc.TUNABLE}'


def test_no_reexec_when_opted_out_set_already_or_not_on_cpu():
  for env in (_env(NORMJAX_TUNE_MALLOC='0'), _env(GLIBC_TUNABLES=cpu_malloc.TUNABLE),
              _env(JAX_PLATFORMS='cuda')):
    assert len(_run(_ENTRY, env)) == 1, env


def test_tunables_only_where_the_kernel_madvises_huge_pages(tmp_path):
  setting = tmp_path / 'enabled'
  for text, mode in (('always [madvise] never\n', 'madvise'), ('[always] madvise never\n', 'always'),
                     ('always madvise [never]\n', 'never')):
    setting.write_text(text)
    assert cpu_malloc.thp_mode(setting) == mode
  assert cpu_malloc.thp_mode(tmp_path / 'missing') == ''
  cpu = {'JAX_PLATFORMS': 'cpu'}
  assert cpu_malloc.tunables_to_set(cpu, mode='madvise') == cpu_malloc.TUNABLE
  for mode in ('always', 'never', ''):  # huge pages everywhere already, or none to advise
    assert cpu_malloc.tunables_to_set(cpu, mode=mode) is None
  assert cpu_malloc.tunables_to_set({**cpu, 'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'},
                                    mode='madvise') == f'glibc.malloc.tcache_count=0:{cpu_malloc.TUNABLE}'
  assert cpu_malloc.tunables_to_set({'JAX_PLATFORMS': 'tpu'}, mode='madvise') is None
  assert cpu_malloc.tunables_to_set({**cpu, cpu_malloc.OPT_OUT: '0'}, mode='madvise') is None
  assert cpu_malloc.huge_pages_on({'GLIBC_TUNABLES': f'glibc.malloc.tcache_count=0:{cpu_malloc.TUNABLE}'})
  assert not cpu_malloc.huge_pages_on({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
