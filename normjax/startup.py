"""What every entry point (main, sweep, tune, the analyses) does first, before jax starts a backend."""
from normjax import cpu_malloc, metrics_io


def prepare_process() -> bool:
  """Filters library INFO logs and, where jax runs on the CPU, tunes malloc; True if it did."""
  metrics_io.quiet_library_logs()
  return cpu_malloc.tune_malloc_on_cpu()  # before jax starts its threads
