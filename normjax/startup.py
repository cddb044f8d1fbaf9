"""What every entry point does first: in `__main__`, the malloc re-exec; in main(), the rest."""
from normjax import cpu_malloc, metrics_io


def reexec_for_cpu() -> None:
  """First thing in `if __name__ == '__main__':` (it replaces the process; never in library code)."""
  cpu_malloc.reexec_with_huge_pages()


def prepare_process() -> bool:
  """Filters library INFO logs and logs the malloc state; True if XLA's buffers get huge pages."""
  metrics_io.quiet_library_logs()
  return cpu_malloc.log_state()
