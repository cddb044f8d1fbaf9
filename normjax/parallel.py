"""Data parallelism with jit over a device mesh, and multi-host set-up with jax.distributed.

The batch is sharded on the mesh's `data` axis; parameters are replicated.
Under jit, BatchNorm's batch mean is over the global batch, exactly as on one
device. A second mesh axis (e.g. `model` for FSDP) can be added in `make_mesh`
and `state_sharding` without touching the train step.
"""
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from normjax.errors import ConfigError

DATA_AXIS = 'data'



def _launched_multiprocess() -> bool:
  """True under a multi-process launch that jax.distributed can auto-detect."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')  # multi-host TPU VM slice


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1) -> None:
  """jax.distributed.initialize from explicit flags, or auto-detected on TPU pods / SLURM / MPI."""
  if not coordinator_address and not _launched_multiprocess():
    return
  if (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')) == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # cross-process CPU collectives
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(state: Any, mesh: Mesh) -> Any:
  """Replicated parameters and optimizer state (pure data parallelism)."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def check_batch_size(field: str, global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ConfigError(f'config.{field} = {global_batch} must be divisible by the {n} devices '
                      f'({jax.process_count()} process(es)); use a multiple of {n}')


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded on `data`."""
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_sum(x: jax.Array) -> float:
  """Sum of the rows of a batch-sharded array that live on this process (each row once)."""
  seen, total = set(), 0.0
  for shard in x.addressable_shards:
    key = tuple((i.start, i.stop) for i in shard.index)
    if key not in seen:  # replicas of the same rows count once
      seen.add(key)
      total += float(np.asarray(shard.data, np.float64).sum())
  return total


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Element-wise sum of a host array across all processes."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)
