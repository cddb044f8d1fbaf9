r"""Training-step throughput and peak memory of normjax configs, across device counts.

Times exactly the jitted, donated train step that `normjax.train` runs (`normjax.steps`) (augmentation,
forward, backward, clipping, optimizer, monitor), on synthetic uint8 batches.

  # data parallelism with 1, 2 and 4 (fake CPU) devices
  python benchmarks/train_throughput.py --configs=configs/bn_scratch.py:cpu,batch=64 --devices=1,2,4
  # normalizer-free + AGC vs BatchNorm at the same batch
  python benchmarks/train_throughput.py --configs=configs/nf_agc_scratch.py:cpu,batch=64,configs/bn_scratch.py:cpu,batch=64

  # glibc malloc as normjax sets it (huge pages) against untouched: faults/step and sys cores
  NORMJAX_TUNE_MALLOC=0 python benchmarks/train_throughput.py --configs=configs/bn_scratch.py:batch=64 --steps=8

Each (config, device count) runs in its own process, since the device count is
fixed when JAX starts. On CPU the device count comes from
XLA_FLAGS=--xla_force_host_platform_device_count; on GPU/TPU the real devices
are used and --devices must not exceed them.
"""  # noqa: E501  (the commands above, one line each)
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

_CONFIGS = flags.DEFINE_list('configs', None,
                             'Config specs (path[:arg]); commas inside an :arg stay with it.')
_DEVICES = flags.DEFINE_list('devices', ['1'], 'Device counts to run each config on.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after 3 warm-up steps).')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run one config in this process.')


def _measure(spec: str, num_steps: int) -> dict:
  from normjax import startup  # pylint: disable=g-import-not-at-top
  startup.prepare_process()  # as normjax.main does, before jax starts its threads
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from normjax import config_schema, parallel, steps  # pylint: disable=g-import-not-at-top

  config = config_schema.load_config(spec)
  mesh = parallel.make_mesh()
  batch, size = config.train.batch_size, config.data.image_size
  channels = 1 if config.data.name.startswith('fashion') else 3
  programs = steps.build_programs(config, 10, (size, size, channels), (0.5,) * channels, (0.25,) * channels,
                                  steps_per_epoch=1000, mesh=mesh)
  rng = jax.random.PRNGKey(0)
  state = programs.init(rng)
  data = np.random.default_rng(0)
  images = data.integers(0, 256, (batch, size, size, channels), np.uint8)
  batch_arrays = parallel.global_batch({'image': images, 'label': data.integers(0, 10, (batch,), np.int32)},
                                       mesh)
  for _ in range(3):
    state = programs.train_step(state, batch_arrays['image'], batch_arrays['label'], rng)
  jax.block_until_ready(state)
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  for _ in range(num_steps):
    state = programs.train_step(state, batch_arrays['image'], batch_arrays['label'], rng)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {'config': spec, 'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
          'batch': batch, 'images_per_sec': num_steps * batch / seconds,
          'ms_per_step': 1e3 * seconds / num_steps,
          # Page faults and kernel time: what the malloc tunables change (normjax/cpu_malloc.py).
          'faults_per_step': (after.ru_minflt - before.ru_minflt) / num_steps,
          'system_cores': (after.ru_stime - before.ru_stime) / seconds,
          'peak_device_bytes': stats.get('peak_bytes_in_use'),
          'peak_host_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str]) -> None:
  del argv
  if _WORKER.value:
    print('RESULT ' + json.dumps(_measure(_WORKER.value, _STEPS.value)))
    return
  from normjax import config_schema  # pylint: disable=g-import-not-at-top  (after sys.path is set)
  if not _CONFIGS.value:
    raise app.UsageError('--configs is required')
  rows = []
  for spec in config_schema.split_config_specs(','.join(_CONFIGS.value)):
    for n in _DEVICES.value:
      env = {**os.environ, 'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} '
                                        f'--xla_force_host_platform_device_count={n}'.strip()}
      out = subprocess.run([sys.executable, __file__, f'--worker={spec}', f'--steps={_STEPS.value}'],
                           env=env, capture_output=True, text=True, check=False)
      result = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
      if out.returncode or not result:
        sys.exit(f'{spec} on {n} device(s) failed:\n{out.stderr[-3000:]}')
      rows.append(json.loads(result[0][len('RESULT '):]))
  base = rows[0]['images_per_sec']
  print(f'device: {rows[0]["device_kind"]}; {_STEPS.value} timed steps after 3 warm-up steps')
  print(f'{"config":48s} {"devices":>7s} {"batch":>5s} {"img/s":>9s} {"ms/step":>8s} {"ratio":>6s} '
        f'{"faults/step":>11s} {"sys cores":>9s} {"peak device MiB":>15s} {"peak host RSS MiB":>17s}')
  for r in rows:
    device_mib = f'{r["peak_device_bytes"] / 2**20:.0f}' if r['peak_device_bytes'] else 'n/a'
    print(f'{r["config"]:48s} {r["devices"]:7d} {r["batch"]:5d} {r["images_per_sec"]:9.1f} '
          f'{r["ms_per_step"]:8.1f} {r["images_per_sec"] / base:6.2f} {r["faults_per_step"]:11.0f} '
          f'{r["system_cores"]:9.2f} {device_mib:>15s} '
          f'{r["peak_host_rss_bytes"] / 2**20:17.0f}')


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from normjax import startup  # pylint: disable=g-import-not-at-top
  startup.reexec_for_cpu()  # as normjax's entry points do
  app.run(main)
