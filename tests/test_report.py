"""normjax.report on synthetic workdirs written in the contract's format."""
import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from normjax import config_schema, report, runs

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def base_config() -> dict:
  """configs/base.py as the nested dict that summary.json and config.json hold."""
  return config_schema.load_config(str(REPO / 'configs' / 'base.py')).to_dict()


def write_run(path: pathlib.Path, *, overrides: dict | None = None, epochs: int = 4,
              acc: tuple = (0.74, 0.9), grad: tuple = (44.0, 28.0), finished: bool = True,
              layer_blocks: tuple = ('backbone/features_18', 'head/fc1', 'head/norm',
                                     'head/out'),
              agc: bool = False, summary_extra: dict | None = None, seed: int = 0) -> dict:
  """A run with plausible curves; returns the summary it wrote (or would write)."""
  rng = np.random.default_rng(seed)
  config = base_config()
  config['train']['num_epochs'] = epochs
  for dotted, value in (overrides or {}).items():
    *sections, key = dotted.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[key] = value
  clip = config['optim']['clip']
  steps_per_epoch, windows = 100, 4
  records, step = [], 0
  val_acc = [acc[0] + (acc[1] - acc[0]) * (1 - 0.5**e) / (1 - 0.5**(epochs - 1))
             for e in range(epochs)]
  n_train = epochs * windows
  for e in range(epochs):
    for w in range(windows):
      step += steps_per_epoch // windows
      t = (e * windows + w) / max(n_train - 1, 1)
      g = grad[0] * (grad[1] / grad[0])**t * (1 + 0.05 * rng.standard_normal())
      records.append({
          'kind': 'train', 'step': step, 'epoch': step / steps_per_epoch,
          'loss': 1.6 * (1 - t) + 0.3, 'accuracy': 0.6 + 0.3 * t, 'grad_norm': g,
          'grad_norm_clipped': min(g, 1.0) if clip == 'global_norm' else g,
          'clip_fired': float(clip == 'global_norm'), 'param_norm': 50.0, 'update_norm': 0.01,
          'lr': 1e-3, 'images_per_sec': 500.0 + w})
    if layer_blocks:
      layer = {'kind': 'layers', 'step': step, 'epoch': step / steps_per_epoch}
      g_epoch = grad[0] * (grad[1] / grad[0])**(e / max(epochs - 1, 1))
      for i, block in enumerate(layer_blocks):
        g = g_epoch * 10**(1.5 * i / len(layer_blocks) - 1.5) * (1 + 0.2 * rng.random())
        frac = min(1.0, 0.1 * i)
        clipped = {'none': g, 'global_norm': g * min(1.0, 1.0 / g_epoch),
                   'agc': g * (1 - 0.5 * frac)}[clip]
        layer[f'grad_norm/{block}'] = g
        layer[f'grad_norm_clipped/{block}'] = clipped
        layer[f'param_norm/{block}'] = 10.0
        if agc:
          layer[f'agc_clipped_frac/{block}'] = frac
      records.append(layer)
    records.append({'kind': 'val', 'step': step, 'epoch': float(e + 1), 'loss': 1.0 - val_acc[e],
                    'accuracy': val_acc[e]})
  train = [r for r in records if r['kind'] == 'train']
  test_acc = val_acc[-1] - 0.004
  summary = {
      'config': config, 'final_val_accuracy': val_acc[-1], 'best_val_accuracy': max(val_acc),
      'epoch1_val_accuracy': val_acc[0], 'test_accuracy': test_acc, 'test_loss': 0.3,
      'epochs': float(epochs), 'steps': step, 'wall_time_s': 3725.0, 'images_per_sec': 812.5,
      'device_kind': 'NVIDIA H100', 'num_devices': 1, 'grad_norm_first': train[0]['grad_norm'],
      'grad_norm_last': train[-1]['grad_norm'], 'num_params': 2_554_954,
      **(summary_extra or {})}
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps(config))
  if finished:
    records.append({'kind': 'test', 'step': step, 'epoch': float(epochs), 'loss': 0.3,
                    'accuracy': test_acc})
    (path / 'summary.json').write_text(json.dumps(summary))
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  return summary


STUDY_SIX = {  # name -> (head_norm, clip, grad start/end)
    'bn_noclip': ('bn', 'none', (15.0, 9.0)),
    'bn_clip': ('bn', 'global_norm', (15.46, 0.29)),
    'ln_noclip': ('ln', 'none', (44.0, 28.0)),
    'ln_clip': ('ln', 'global_norm', (44.0, 20.0)),
    'frn_noclip': ('frn', 'none', (44.0, 28.5)),
    'frn_clip': ('frn', 'global_norm', (43.0, 21.0)),
}


def write_study(root: pathlib.Path) -> dict:
  summaries = {}
  for i, (name, (norm, clip, grad)) in enumerate(STUDY_SIX.items()):
    summaries[name] = write_run(
        root / name,
        overrides={'model.head_norm': norm, 'optim.clip': clip, 'data.name': 'cifar10_jpeg'},
        acc=(0.72 + 0.005 * i, 0.895 + 0.002 * i), grad=grad, seed=i)
  return summaries


def parse_table(md: str, heading: str) -> list[dict[str, str]]:
  """The first markdown table after `heading`, as one dict per row keyed by column."""
  block = []
  for line in md.split(heading, 1)[1].splitlines()[1:]:
    if line.startswith('|'):
      block.append(line)
    elif block:
      break
  header = [c.strip() for c in block[0].strip('|').split('|')]
  return [dict(zip(header, [c.strip() for c in row.strip('|').split('|')])) for row in block[2:]]


def assert_png(path: pathlib.Path, min_bytes: int = 10_000) -> None:
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC, path
  assert len(data) > min_bytes, (path, len(data))
  width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
  assert width >= 400 and height >= 300, (path, width, height)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  root = tmp_path_factory.mktemp('study')
  summaries = write_study(root)
  md_path = report.write_report(root)
  return root, summaries, md_path.read_text()


def test_table_numbers_equal_inputs(study):
  root, summaries, md = study
  rows = {r['run']: r for r in parse_table(md, '## Runs')}
  assert set(rows) == {f'`{n}`' for n in STUDY_SIX}
  for name, s in summaries.items():
    row = rows[f'`{name}`']
    assert row['status'] == 'done'
    assert float(row['final val %']) == pytest.approx(100 * s['final_val_accuracy'], abs=5e-3)
    assert float(row['best val %']) == pytest.approx(100 * s['best_val_accuracy'], abs=5e-3)
    assert float(row['epoch-1 val %']) == pytest.approx(100 * s['epoch1_val_accuracy'],
                                                        abs=5e-3)
    assert float(row['test %']) == pytest.approx(100 * s['test_accuracy'], abs=5e-3)
    assert float(row['grad norm start']) == pytest.approx(s['grad_norm_first'], rel=1e-3)
    assert float(row['grad norm end']) == pytest.approx(s['grad_norm_last'], rel=1e-3)
    assert row['images/s'] == '812.5'
    assert row['wall time'] == '1:02:05'  # 3725 s
    assert row['device'] == 'NVIDIA H100 x1'
    assert (row['data'], row['image size'], row['batch']) == ('cifar10_jpeg', '224', '64')
    assert (row['model'], row['backbone norm']) == ('mobilenet_v2', 'bn')
    assert row['head'] == f'mlp/{STUDY_SIX[name][0]}'
  assert rows['`bn_clip`']['clip'] == 'global_norm (1.0)'
  assert rows['`bn_noclip`']['clip'] == 'none'


def test_study_reference_column(study):
  _, _, md = study
  rows = {r['run']: r for r in parse_table(md, '## Runs')}
  ref = {k.strip('`'): re.sub(r' \[\d+\]$', '', v['study ref: final val %'])
         for k, v in rows.items()}
  assert ref == {'bn_noclip': 'BN-NoClip: 89.64', 'bn_clip': 'BN-Clip: 90.71',
                 'ln_noclip': 'LN-NoClip: 90.22', 'ln_clip': 'LN-Clip: n/a',
                 'frn_noclip': 'FRN-NoClip: 90.57', 'frn_clip': 'FRN-Clip: n/a'}
  # Every run is on cifar10_jpeg for 4 epochs: one footnote, naming the JPEG re-encoding.
  assert [v['study ref: final val %'][-3:] for v in rows.values()] == ['[1]'] * 6
  notes = re.findall(r'^\[(\d+)\] (.*)$', md, re.M)
  assert notes == [('1', "Not the study's recipe: data.name=cifar10_jpeg (study: cifar10, a JPEG "
                    're-encoding of CIFAR-10); model.frozen_bn=eval (study: train); '
                    'train.num_epochs=4 (study: 15). Runs: '
                    + ', '.join(sorted(rows)) + '.')]
  study_rows = {r['study run']: r for r in parse_table(md, '## Study reference')}
  assert study_rows['BN-Clip'] == {'study run': 'BN-Clip', 'final val %': '90.71',
                                   'epoch-1 val %': '75.16',
                                   'grad norm start -> end': '15.46 -> 0.29'}
  assert study_rows['BN-NoClip']['epoch-1 val %'] == '73.73'
  assert 'ImageNet-pretrained' in md and '224x224' in md and 'JPEG' in md


def test_study_mapping_rules(tmp_path):
  cases = {
      'exact': ({'train.num_epochs': 15, 'model.frozen_bn': 'train'}, 'BN-NoClip: 89.64'),
      'gn_backbone': ({'model.norm': 'gn'}, '-'),
      'linear_head': ({'model.head': 'linear'}, '-'),
      'gn_head': ({'model.head_norm': 'gn'}, '-'),
      'agc': ({'optim.clip': 'agc'}, '-'),
      'clip_half': ({'optim.clip': 'global_norm', 'optim.clip_norm': 0.5}, '-'),
      'nf': ({'model.name': 'nf_mobilenet_v2', 'model.norm': 'none'}, '-'),
  }
  for name, (overrides, _) in cases.items():
    write_run(tmp_path / name, overrides=overrides, layer_blocks=())
  rows = {r['run'].strip('`'): r for r in
          parse_table(report.write_report(tmp_path).read_text(), '## Runs')}
  assert {k: v['study ref: final val %'] for k, v in rows.items()} == {
      k: v for k, (_, v) in cases.items()}
  assert rows['linear_head']['head'] == 'linear'  # head_norm only applies to the MLP head
  assert rows['agc']['clip'] == 'agc (lambda=0.01)'


def test_cached_runs_name_their_augmentation_variants(tmp_path):
  cached = {'train.num_epochs': 15, 'train.feature_cache': 'auto'}  # frozen_bn=eval: cacheable
  write_run(tmp_path / 'k4', overrides={**cached, 'data.augment_variants': 4}, layer_blocks=())
  write_run(tmp_path / 'exact', overrides={**cached, 'data.augment_variants': 0}, layer_blocks=())
  # frozen_bn=train cannot be cached: 'auto' trains it online with fresh augmentation.
  write_run(tmp_path / 'online', overrides={**cached, 'model.frozen_bn': 'train'}, layer_blocks=())
  md = report.write_report(tmp_path).read_text()
  rows = {r['run'].strip('`'): r for r in parse_table(md, '## Runs')}
  assert {k: v['aug. variants'] for k, v in rows.items()} == {'exact': '15', 'k4': '4',
                                                             'online': 'fresh'}
  assert rows['online']['study ref: final val %'] == 'BN-NoClip: 89.64'
  notes = dict(re.findall(r'^\[(\d+)\] (.*)$', md, re.M))
  k4_note = notes[rows['k4']['study ref: final val %'][-2]]
  exact_note = notes[rows['exact']['study ref: final val %'][-2]]
  assert 'data.augment_variants=4: the frozen-feature cache holds 4 augmentations' in k4_note
  assert 'augment_variants' not in exact_note and 'model.frozen_bn=eval (study: train)' in exact_note


def test_pngs_written_and_valid(study):
  root, _, md = study
  for name in ('curves.png', 'layer_grad_norms.png', 'layer_grad_dist.png'):
    assert f']({name})' in md
    assert_png(root / name)
  assert not (root / 'batch_size.png').exists()
  assert not (root / 'agc_clipped_frac.png').exists()
  assert '## Batch size' not in md


def test_out_dir_and_cli(tmp_path, capsys):
  write_run(tmp_path / 'runs' / 'a', layer_blocks=())
  assert report.main([str(tmp_path / 'runs'), f'--out={tmp_path / "out"}']) == 0
  assert capsys.readouterr().out == f'wrote {tmp_path / "out" / "report.md"}\n'
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['curves.png', 'report.md']
  assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == ['a']
  md = (tmp_path / 'out' / 'report.md').read_text()
  assert 'No run has "layers" records' in md


def test_in_progress_run(tmp_path):
  summary = write_run(tmp_path / 'sweep' / 'done', epochs=3, layer_blocks=())
  write_run(tmp_path / 'sweep' / 'running', epochs=2, acc=(0.5, 0.6), grad=(10.0, 5.0),
            finished=False, layer_blocks=())
  with open(tmp_path / 'sweep' / 'running' / 'metrics.jsonl', 'a') as f:
    f.write('{"kind": "train", "step": 2')  # torn last line: a writer mid-append
  rows = {r['run']: r for r in
          parse_table(report.write_report(tmp_path).read_text(), '## Runs')}
  assert set(rows) == {'`sweep/done`', '`sweep/running`'}
  assert rows['`sweep/done`']['status'] == 'done'
  assert float(rows['`sweep/done`']['test %']) == pytest.approx(
      100 * summary['test_accuracy'], abs=5e-3)
  running = rows['`sweep/running`']
  assert running['status'] == 'in progress'
  records = [json.loads(l) for l in
             (tmp_path / 'sweep' / 'running' / 'metrics.jsonl').read_text().splitlines()[:-1]]
  val = [r['accuracy'] for r in records if r['kind'] == 'val']
  train = [r for r in records if r['kind'] == 'train']
  assert float(running['final val %']) == pytest.approx(100 * val[-1], abs=5e-3)
  assert float(running['best val %']) == pytest.approx(100 * max(val), abs=5e-3)
  assert float(running['epoch-1 val %']) == pytest.approx(100 * val[0], abs=5e-3)
  assert float(running['grad norm start']) == pytest.approx(train[0]['grad_norm'], rel=1e-3)
  assert float(running['grad norm end']) == pytest.approx(train[-1]['grad_norm'], rel=1e-3)
  assert running['images/s'] == '501.5'  # median of 500..503 per epoch window
  assert running['epochs'] == '2'
  for col in ('test %', 'wall time', 'device'):
    assert running[col] == 'n/a'
  assert '2 runs, 1 done, 1 in progress' in (tmp_path / 'report.md').read_text()


def test_corrupt_metrics_line_names_file(tmp_path):
  write_run(tmp_path / 'a', layer_blocks=())
  path = tmp_path / 'a' / 'metrics.jsonl'
  lines = path.read_text().splitlines()
  path.write_text('\n'.join([lines[0], 'garbage', *lines[1:]]) + '\n')
  with pytest.raises(ValueError, match=re.escape(f'{path}: not a JSON record')):
    report.write_report(tmp_path)


def test_no_runs_is_an_error(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no runs under'):
    report.write_report(tmp_path)
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    report.write_report(tmp_path / 'missing')


def test_layer_blocks_in_depth_order_and_combined(tmp_path):
  blocks = ('head/out', 'backbone/features_10/conv', 'backbone/features_2/conv_0',
            'backbone/features_2/conv_1', 'head/fc1')
  write_run(tmp_path / 'r', layer_blocks=blocks, agc=True,
            overrides={'optim.clip': 'agc', 'model.name': 'nf_mobilenet_v2',
                       'model.norm': 'none'})
  run, = runs.find_runs(tmp_path)
  per_block = report.block_values(run, 'grad_norm')
  assert list(per_block) == ['backbone/features_2', 'backbone/features_10', 'head/fc1',
                             'head/out']
  raw = report.layer_values(run, 'grad_norm')
  np.testing.assert_allclose(
      per_block['backbone/features_2'],
      np.hypot(raw['backbone/features_2/conv_0'], raw['backbone/features_2/conv_1']))
  frac = report.block_values(run, 'agc_clipped_frac')
  np.testing.assert_allclose(frac['backbone/features_2'], 0.25)  # mean of 0.2 and 0.3
  np.testing.assert_allclose(frac['head/out'], 0.0)
  md = report.write_report(tmp_path).read_text()
  assert '](agc_clipped_frac.png)' in md
  for name in ('layer_grad_norms.png', 'layer_grad_dist.png', 'agc_clipped_frac.png'):
    assert_png(tmp_path / name)


def test_batch_size_section(tmp_path):
  expected = {}
  for model, norm, clip in (('mobilenet_v2', 'bn', 'none'), ('nf_mobilenet_v2', 'none', 'agc')):
    for i, bs in enumerate((16, 64, 256)):
      name = f'{model}_bs{bs}'
      s = write_run(tmp_path / name, layer_blocks=(), acc=(0.5, 0.8 + 0.01 * i),
                    overrides={'model.name': model, 'model.norm': norm, 'optim.clip': clip,
                               'train.batch_size': bs},
                    summary_extra={'peak_memory_bytes': bs * 2**24,
                                   'images_per_sec': 100.0 * bs})
      expected[f'`{name}`'] = (bs, s)
  md = report.write_report(tmp_path).read_text()
  rows = parse_table(md, '## Batch size')
  assert [r['run'] for r in rows] == [f'`mobilenet_v2_bs{b}`' for b in (16, 64, 256)] + [
      f'`nf_mobilenet_v2_bs{b}`' for b in (16, 64, 256)]
  for row in rows:
    bs, s = expected[row['run']]
    assert row['batch'] == str(bs)
    assert float(row['test %']) == pytest.approx(100 * s['test_accuracy'], abs=5e-3)
    assert float(row['images/s']) == 100.0 * bs
    assert row['peak memory'] == f'{bs / 64:.2f} GiB'
  assert rows[0]['model'] == 'mobilenet_v2 (norm bn, clip none)'
  assert rows[3]['model'] == 'nf_mobilenet_v2 (norm none (NF), clip agc (lambda=0.01))'
  assert_png(tmp_path / 'batch_size.png')
  # A run still in progress (metrics, no summary) is not a point of the figure or the table.
  write_run(tmp_path / 'mobilenet_v2_bs8', layer_blocks=(), acc=(0.2, 0.3), finished=False,
            overrides={'model.name': 'mobilenet_v2', 'model.norm': 'bn', 'train.batch_size': 8})
  md = report.write_report(tmp_path).read_text()
  assert {r['run']: r['status'] for r in parse_table(md, '## Runs')}['`mobilenet_v2_bs8`'] == 'in progress'
  assert sorted(r['run'] for r in parse_table(md, '## Batch size')) == sorted(expected)
  assert '1 run(s) still in progress are left out of this section.' in md
  shutil.rmtree(tmp_path / 'mobilenet_v2_bs8')
  # A rerun without differing batch sizes drops the section and its stale figure.
  for name in list(expected)[1:]:
    shutil.rmtree(tmp_path / name.strip('`'))
  md = report.write_report(tmp_path).read_text()
  assert '## Batch size' not in md
  assert not (tmp_path / 'batch_size.png').exists()


def test_batch_sensitivity_sweep_gives_wu_he_errors_per_norm(tmp_path):
  """Run dirs as `normjax.sweep --configs=configs/batch_sensitivity.py:norm=N,batch=B,...` names them."""
  errors = {'bn': {2: 70.0, 8: 55.0, 64: 47.5}, 'gn': {2: 50.0, 8: 49.5, 64: 49.0},
            'nf': {2: 56.0, 8: 55.0, 64: 54.0}}
  for norm, by_batch in errors.items():
    for batch, err in by_batch.items():
      spec = f'norm={norm},batch={batch}'
      config = config_schema.load_config(str(REPO / 'configs' / f'batch_sensitivity.py:{spec}')).to_dict()
      run = tmp_path / config_schema.config_stem(f'configs/batch_sensitivity.py:{spec}')
      run.mkdir()
      val = 1 - err / 100
      (run / 'metrics.jsonl').write_text(''.join(
          json.dumps({'kind': 'val', 'step': e, 'epoch': float(e), 'loss': 1.0, 'accuracy': val - 0.1 / e})
          + '\n' for e in range(1, 5)) + json.dumps({'kind': 'val', 'step': 5, 'epoch': 5.0, 'loss': 1.0,
                                                     'accuracy': val}) + '\n')
      (run / 'summary.json').write_text(json.dumps({
          'config': config, 'final_val_accuracy': val, 'test_accuracy': val - 0.01, 'epochs': 5.0,
          'images_per_sec': 10.0 * batch, 'wall_time_s': 100.0}))
  md = report.write_report(tmp_path).read_text()
  rows = parse_table(md, '## Batch size')
  assert [(r['model'], r['batch']) for r in rows] == [
      (label, str(b)) for label in ('mobilenet_v2 (norm bn, clip none)', 'mobilenet_v2 (norm gn, clip none)',
                                    'nf_mobilenet_v2 (norm none (NF), clip agc (lambda=0.16))')
      for b in (2, 8, 64)]
  assert [float(r['val error %']) for r in rows] == [errors[n][b] for n in ('bn', 'gn', 'nf') for b in (2, 8, 64)]
  assert rows[0]['run'] == '`batch_sensitivity-normbn-batch2`' and rows[0]['test %'] == '29.00'
  assert '- mobilenet_v2 (norm bn, clip none): 47.50% at batch 64 -> 70.00% at batch 2 (+22.50 points); range ' \
         '22.50 points' in md
  assert '- mobilenet_v2 (norm gn, clip none): 49.00% at batch 64 -> 50.00% at batch 2 (+1.00 points)' in md
  assert_png(tmp_path / 'batch_size.png')


def test_windows_with_null_values_are_left_out_of_the_curves(tmp_path):
  """metrics.jsonl writes NaN as null (a window whose every step was skipped)."""
  write_run(tmp_path / 'skipped', layer_blocks=())
  with open(tmp_path / 'skipped' / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'kind': 'train', 'step': 999, 'epoch': 9.99, 'loss': None,
                        'accuracy': None, 'grad_norm': None}) + '\n')
  md = report.write_report(tmp_path).read_text()
  assert (tmp_path / 'curves.png').stat().st_size > 0 and '![curves]' in md


def test_sharpness_column_reads_the_runs_landscape(tmp_path):
  from normjax import landscape
  write_run(tmp_path / 'with', layer_blocks=())
  write_run(tmp_path / 'without', layer_blocks=())
  xs = np.linspace(-1, 1, 21)
  surface = landscape.Surface.empty(xs, None, {})
  surface.loss[:] = 0.3 + 2.0 * xs ** 2  # (L(-0.5) + L(0.5)) / 2 - L(0) = 2 * 0.25 = 0.5
  surface.accuracy[:] = 0.9
  surface.done[:] = True
  surface.save(tmp_path / 'with' / 'landscape' / 'surface_1d_p21_s1.0_val_n100_seed0_biasbn0.npz')
  rows = {r['run'].strip('`'): r for r in parse_table(report.write_report(tmp_path).read_text(), '## Runs')}
  assert rows['with']['sharpness'] == '0.5' and rows['without']['sharpness'] == 'n/a'


def test_seeds_section_gives_mean_and_std_over_runs_that_differ_only_in_seed(tmp_path, capsys):
  """Seed 0 in one workdir, seeds 1 and 2 in another (as workdir/study and workdir/study_seeds)."""
  finals = {'frn_noclip': (0.80, 0.81, 0.795), 'bn_clip': (0.805, 0.812, 0.809)}
  summaries = {name: [] for name in finals}
  for name, values in finals.items():
    norm, clip, _ = STUDY_SIX[name]
    for seed, final in enumerate(values):
      path = (tmp_path / 'study' / name if seed == 0 else
              tmp_path / 'study_seeds' / f'seed{seed}' / name)
      summaries[name].append(write_run(path, layer_blocks=(), acc=(0.7, final), seed=seed,
                                       overrides={'seed': seed, 'model.head_norm': norm,
                                                  'optim.clip': clip}))
  # Same seed 1 but another LR: a different config, in no group.
  write_run(tmp_path / 'study_seeds' / 'seed1' / 'frn_lr', layer_blocks=(), acc=(0.7, 0.5),
            overrides={'seed': 1, 'model.head_norm': 'frn', 'optim.lr': 3e-3})
  out = tmp_path / 'report'
  md = report.write_report([tmp_path / 'study', tmp_path / 'study_seeds'], out).read_text()
  rows = parse_table(md, '## Seeds')
  assert [r['config'] for r in rows] == ['BN-Clip', 'FRN-NoClip']  # best mean final val first
  for row, name in zip(rows, ('bn_clip', 'frn_noclip')):
    assert row['seeds'] == '0, 1, 2' and row['n'] == '3'
    for column, key in (('final val %', 'final_val_accuracy'), ('test %', 'test_accuracy'),
                        ('epoch-1 val %', 'epoch1_val_accuracy')):
      values = 100 * np.array([s[key] for s in summaries[name]])
      mean, std = (float(x) for x in row[column].split(' ± '))
      assert mean == pytest.approx(values.mean(), abs=5e-3)
      assert std == pytest.approx(values.std(ddof=1), abs=5e-3)
    assert row['runs'] == (f'`study/{name}`, `study_seeds/seed1/{name}`, '
                           f'`study_seeds/seed2/{name}`')
  assert '`study_seeds/seed1/frn_lr`' in {r['run'] for r in parse_table(md, '## Runs')}
  assert 'frn_lr' not in md.split('## Seeds', 1)[1].split('## Curves', 1)[0]
  # Run directories as roots keep their names.
  md = report.write_report([tmp_path / 'study' / 'bn_clip', tmp_path / 'study_seeds'], out).read_text()
  assert parse_table(md, '## Seeds')[0]['runs'] == (
      '`bn_clip`, `study_seeds/seed1/bn_clip`, `study_seeds/seed2/bn_clip`')
  # One workdir of one seed each: no section.
  assert '## Seeds' not in report.write_report(tmp_path / 'study').read_text()
  # Several workdirs need --out; the CLI says so in one line and exits 2.
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / 'study'), str(tmp_path / 'study_seeds')])
  assert e.value.code == 2
  assert 'out' in capsys.readouterr().err
