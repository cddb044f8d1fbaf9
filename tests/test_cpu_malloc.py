"""normjax.cpu_malloc: a freed large block is reused without page faults once malloc is tuned."""
import json
import os
import subprocess
import sys

_CYCLE = """
import json, resource, sys
import numpy as np
from normjax import cpu_malloc
tuned = cpu_malloc.tune_malloc() if sys.argv[1] == '1' else None
again = cpu_malloc.tune_malloc() if tuned else None  # idempotent
faults = []
for _ in range(2):  # allocate, touch, free 256 MB twice
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = np.empty(256 << 20, np.uint8)
  block.fill(1)
  del block
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'tuned': tuned, 'again': again, 'faults': faults}))
"""


def _cycle(tune: bool) -> dict:
  out = subprocess.run([sys.executable, '-c', _CYCLE, '1' if tune else '0'], capture_output=True, text=True,
                       check=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
  return json.loads(out.splitlines()[-1])


def test_tuned_malloc_reuses_freed_memory():
  plain, tuned = _cycle(False), _cycle(True)
  assert tuned['tuned'] is True and tuned['again'] is True  # this test runs on Linux with glibc
  # Untuned, glibc unmaps the freed block and the second cycle faults it in again; tuned, it reuses it.
  # >= 128 faults even with transparent huge pages (numpy madvises them: 2 MB per fault).
  assert plain['faults'][1] > 100, plain
  assert tuned['faults'][1] * 10 < plain['faults'][1], (plain, tuned)
