"""The per-call timer of the kernel benchmarks (matmul_bf16.py, depthwise_speed.py)."""
import statistics
import time
from typing import Any, Callable

import jax


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
  """Median milliseconds of fn(*args) over `repeats` calls, after one call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3
