"""normjax.tune and models/tunable_cnn.py: parameter counts, the seed's search space, runs, resume, pruning."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest

from normjax import config_schema, errors, metrics_io, train, tune
from normjax.models import factory

# A space of tiny nets, so an end-to-end search trains in seconds on CPU.
TINY = tune.SearchSpace(conv_layers=(2, 2), filters=(8, 16, 8), kernels=(3,), dense_layers=(2, 2),
                        units=(16, 32, 16))


def count_params(conv_layers: str, dense_layers: str) -> int:
  config = config_schema.load_config('configs/tune_mnist.py')
  config.model.conv_layers, config.model.dense_layers = conv_layers, dense_layers
  model = factory.create_model(config, num_classes=10)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 28, 28, 1)),
                                                train=False))
  names = list(variables['params']['backbone'])
  n_blocks = len(conv_layers.split(',')) + len(dense_layers.split(','))
  assert names == [f'features_{i}' for i in range(n_blocks)] and list(variables['params']['head']) == ['out']
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables['params']))


def test_param_counts_match_hand_counts():
  # 2 convs: 28 -> pool 14 -> pool 7, so Flatten has 7*7*64.
  assert count_params('32x3,64x5', '128,64') == (
      (3 * 3 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64)
      + (7 * 7 * 64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)) == 462_026
  # 5 convs: 28 -> 14 -> 7 -> 3 -> 1, and the fifth (on a 1 px map) is not pooled: Flatten has 96.
  assert count_params('256x5,32x3,64x3,128x5,96x3', '256,32,224,160,64') == (
      (5 * 5 * 1 * 256 + 256) + (3 * 3 * 256 * 32 + 32) + (3 * 3 * 32 * 64 + 64)
      + (5 * 5 * 64 * 128 + 128) + (3 * 3 * 128 * 96 + 96)
      + (96 * 256 + 256) + (256 * 32 + 32) + (32 * 224 + 224) + (224 * 160 + 160) + (160 * 64 + 64)
      + (64 * 10 + 10)) == 501_930
  # 3 convs: 28 -> 14 -> 7 -> 3, Flatten 3*3*32.
  assert count_params('32x3,32x3,32x3', '32,32') == (
      (9 * 32 + 32) + 2 * (9 * 32 * 32 + 32) + (3 * 3 * 32 * 32 + 32) + (32 * 32 + 32) + (32 * 10 + 10))


def test_dropout_acts_in_training_only():
  config = config_schema.load_config('configs/tune_mnist.py')
  config.model.dropout = 0.5
  model = factory.create_model(config, num_classes=10)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
  variables = model.init({'params': jax.random.PRNGKey(0)}, x, train=False)
  run = lambda key: model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(key)})
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(model.apply(variables, x, train=False), model.apply(variables, x, train=False))


@pytest.mark.parametrize('field,good,bad', [
    ('model.conv_layers', ['32x3,64x5', '256x5', ''], ['32', '32x3,', '0x3', '32x3;64x5', 'x3']),
    ('model.dense_layers', ['128,64', '32', ''], ['128x3', '0', '128,,64', '-1']),
])
def test_layer_fields_validate_and_override(field, good, bad):
  config = config_schema.load_config('configs/tune_mnist.py')
  for value in good:  # as --config.<field>= or sweep/tune --set would spell it
    assert config_schema.flatten(config_schema.apply_overrides(config, [f'{field}={value}']))[field] == value
  for value in bad:
    with pytest.raises(errors.ConfigError, match=f'config.{field} = '):
      config_schema.apply_overrides(config, [f'{field}={value}'])


def test_sampler_covers_exactly_the_seed_space():
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  seen = {k: set() for k in ('conv', 'filters', 'kernels', 'dense', 'units', 'dropout', 'lr')}
  for _ in range(400):
    fields = tune.suggest(study.ask())
    conv = [tuple(map(int, item.split('x'))) for item in fields['model.conv_layers'].split(',')]
    units = [int(u) for u in fields['model.dense_layers'].split(',')]
    seen['conv'].add(len(conv))
    seen['filters'].update(f for f, _ in conv)
    seen['kernels'].update(k for _, k in conv)
    seen['dense'].add(len(units))
    seen['units'].update(units)
    seen['dropout'].add(fields['model.dropout'])
    seen['lr'].add(fields['optim.lr'])
    assert fields['optim.backbone_lr'] == fields['optim.lr']
  assert seen == {  # study.md section 5; steps of 32 for filters and units
      'conv': {2, 3, 4, 5}, 'filters': set(range(32, 257, 32)), 'kernels': {3, 5},
      'dense': {2, 3, 4, 5}, 'units': set(range(32, 257, 32)),
      'dropout': {0.0, 0.1, 0.2, 0.3, 0.4, 0.5}, 'lr': {1e-4, 5e-4, 1e-3}}
  # A fixed trial gives exactly its params back as config fields.
  fixed = optuna.trial.FixedTrial({'conv_layers': 2, 'filters_0': 64, 'kernel_0': 5, 'filters_1': 256,
                                   'kernel_1': 3, 'dense_layers': 2, 'units_0': 32, 'units_1': 128,
                                   'dropout': 0.30000000000000004, 'lr': 5e-4})
  assert tune.suggest(fixed) == {'model.conv_layers': '64x5,256x3', 'model.dense_layers': '32,128',
                                 'model.dropout': 0.3, 'optim.lr': 5e-4, 'optim.backbone_lr': 5e-4}


def test_default_pruner_is_the_seeds_hyperband():
  pruner = tune.make_pruner()
  assert isinstance(pruner, optuna.pruners.HyperbandPruner)
  # Private fields: HyperbandPruner has no public accessors.
  assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 7, 3)


@pytest.fixture
def config(tfds_dir, shared_data_dir):
  c = config_schema.load_config('configs/tune_mnist.py')
  c.data.tfds_dir = str(tfds_dir)
  c.data.source = str(shared_data_dir / 'mnist')
  c.data.train_subset = 128  # 2 steps of 64 per epoch
  c.train.eval_batch_size = 1000
  return c


class Spy:
  """train.train_and_evaluate, recording (run dir name, train.num_epochs, test) of every call."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir, test=True):
    self.calls.append((pathlib.Path(workdir).name, config.train.num_epochs, test))
    return train.train_and_evaluate(config, workdir, test=test)


def recorded_test_passes(run_dir):
  return [r for r in metrics_io.read_jsonl(run_dir / 'metrics.jsonl') if r['kind'] == 'test']


def val_epochs(run_dir):
  return [r['epoch'] for r in metrics_io.read_jsonl(run_dir / 'metrics.jsonl') if r['kind'] == 'val']


def finished(study):
  return [t for t in study.get_trials() if t.state in (tune.TrialState.COMPLETE, tune.TrialState.PRUNED)]


def test_search_writes_outputs_and_resumes_without_redoing_trials(config, tmp_path):
  spy = Spy()
  study = tune.run_search(config, tmp_path, 2, max_epochs=2, space=TINY, train_fn=spy)
  assert (tmp_path / 'optuna.db').is_file()
  assert len(finished(study)) == 2
  for t in finished(study):
    epochs = sorted(t.intermediate_values)
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) == (2 if t.state.name == 'COMPLETE' else 1)
    # Trained one epoch per call without the test pass, in its own run directory, and the values
    # are its val records; a complete trial then evaluates test once, training nothing more.
    name, complete = f'trial_{t.number}', t.state.name == 'COMPLETE'
    assert [c for c in spy.calls if c[0] == name] == (
        [(name, e, False) for e in epochs] + ([(name, epochs[-1], True)] if complete else []))
    run = tmp_path / name
    assert val_epochs(run) == epochs
    val = [r['accuracy'] for r in metrics_io.read_jsonl(run / 'metrics.jsonl') if r['kind'] == 'val']
    assert [t.intermediate_values[e] for e in epochs] == val
    test = recorded_test_passes(run)
    if complete:
      assert t.value == max(val)
      assert len(test) == 1 and test[0]['step'] == 2 * len(epochs)  # after the last epoch's 2 steps
      summary = metrics_io.read_json(run / 'summary.json')
      assert t.user_attrs['test_accuracy'] == summary['test_accuracy'] == test[0]['accuracy']
    else:
      assert test == [] and not (run / 'summary.json').exists() and 'test_accuracy' not in t.user_attrs
  table = (tmp_path / 'trials.md').read_text()
  assert '| trial | state | epochs | val accuracy | last val | test accuracy |' in table
  assert all(f'\n| {t.number} | {t.state.name} |' in table for t in study.trials)
  assert (tmp_path / 'trials.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  done = {t.number: t.datetime_complete for t in study.trials}
  spy.calls.clear()
  study = tune.run_search(config, tmp_path, 3, max_epochs=2, space=TINY, train_fn=spy)
  assert len(finished(study)) == 3 and len(study.trials) == 3
  assert {t.number: t.datetime_complete for t in study.trials if t.number in done} == done
  assert {c[0] for c in spy.calls} == {'trial_2'}  # only the new trial trained
  # A third run with the target met trains nothing.
  spy.calls.clear()
  tune.run_search(config, tmp_path, 3, max_epochs=2, space=TINY, train_fn=spy)
  assert spy.calls == []


class PruneAtEpoch(optuna.pruners.BasePruner):
  """Prunes every trial once it has reported `epoch`."""

  def __init__(self, epoch):
    self.epoch = epoch

  def prune(self, study, trial):
    return trial.last_step >= self.epoch


def test_pruned_trial_stops_training_at_that_epoch(config, tmp_path):
  spy = Spy()
  study = tune.run_search(config, tmp_path, 1, max_epochs=4, space=TINY, train_fn=spy, pruner=PruneAtEpoch(2))
  (trial,) = study.trials
  assert trial.state == tune.TrialState.PRUNED and sorted(trial.intermediate_values) == [1, 2]
  assert spy.calls == [('trial_0', 1, False), ('trial_0', 2, False)]  # no test pass
  assert recorded_test_passes(tmp_path / 'trial_0') == []
  run = tmp_path / 'trial_0'
  assert val_epochs(run) == [1.0, 2.0]
  assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == [4]  # 2 epochs x 2 steps
  assert '| 0 | PRUNED | 2 |' in (tmp_path / 'trials.md').read_text()


def test_killed_trial_is_rerun_from_its_checkpoint(config, tmp_path):
  # A tune process that died during trial 0's second epoch: the trial is RUNNING, epoch 1 is on disk.
  study = tune.open_study(tmp_path, 'tpe', config.seed, max_epochs=2)
  params = {'conv_layers': 2, 'filters_0': 8, 'kernel_0': 3, 'filters_1': 16, 'kernel_1': 3,
            'dense_layers': 2, 'units_0': 16, 'units_1': 32, 'dropout': 0.1, 'lr': 1e-3}
  study.enqueue_trial(params)
  trial = study.ask()
  run_config = tune.trial_config(config, tune.suggest(trial, TINY))
  run_config.train.num_epochs = 1
  train.train_and_evaluate(run_config, str(tmp_path / 'trial_0'), test=False)
  epoch1 = tune.epoch_val_accuracy(tmp_path / 'trial_0')[1]

  spy = Spy()
  study = tune.run_search(config, tmp_path, 1, max_epochs=2, space=TINY, train_fn=spy,
                          pruner=optuna.pruners.NopPruner())
  killed, rerun = study.trials
  assert killed.state == tune.TrialState.FAIL and rerun.state == tune.TrialState.COMPLETE
  assert rerun.params == params and rerun.user_attrs['retry_of'] == 0
  assert spy.calls == [('trial_1', 2, False), ('trial_1', 2, True)]  # epoch 1 came from the checkpoint
  assert rerun.intermediate_values[1] == epoch1 and sorted(rerun.intermediate_values) == [1, 2]
  assert not (tmp_path / 'trial_0').exists() and val_epochs(tmp_path / 'trial_1') == [1.0, 2.0]
  table = (tmp_path / 'trials.md').read_text()
  assert '| 0 | FAIL |' in table and 'killed; re-run as 1' in table and 're-run of 0' in table


def test_refusals_name_the_field(tmp_path):
  config = config_schema.load_config('configs/tune_mnist.py')
  tune.run_search(config, tmp_path, 0)  # creates the study, trains nothing
  assert (tmp_path / 'optuna.db').is_file() and (tmp_path / 'trials.md').is_file()
  other = config_schema.apply_overrides(config, ['data.train_subset=500'])
  with pytest.raises(errors.ConfigError, match=r'different search \(data.train_subset: 4000 -> 500\)'):
    tune.run_search(other, tmp_path, 0)
  with pytest.raises(errors.ConfigError, match=r'--max_epochs: 7 -> 3'):
    tune.run_search(config, tmp_path, 0, max_epochs=3)
  for override, message in (('optim.schedule=cosine', 'optim.schedule'), ('model.name=cnn_mnist', 'model.name'),
                            ('model.head=mlp', 'model.head')):
    with pytest.raises(errors.ConfigError, match=message):
      tune.run_search(config_schema.apply_overrides(config, [override]), tmp_path / 'x', 0)


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'normjax.tune', '--config=configs/tune_mnist.py', '--trials=1',
       f'--workdir={tmp_path}', '--set=optim.schedule=cosine'], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('tune: error: config.optim.schedule = ')


def fake_train(val_epochs_written, checkpoint_epochs=None):
  """A train_fn writing what train_and_evaluate would: val records and checkpoint dirs (1 step/epoch)."""
  calls = []

  def train_fn(config, workdir, test=True):
    run, epoch = pathlib.Path(workdir), config.train.num_epochs
    calls.append((epoch, test))
    if test:  # the test pass of a complete trial: trains nothing
      return {'test_accuracy': epoch / 100}
    run.mkdir(parents=True, exist_ok=True)
    if epoch in val_epochs_written:
      with open(run / 'metrics.jsonl', 'a') as f:
        f.write(metrics_io.dumps({'kind': 'val', 'step': epoch, 'epoch': float(epoch), 'accuracy': epoch / 10}) + '\n')
    if epoch in (checkpoint_epochs or val_epochs_written):
      (run / 'checkpoints' / str(epoch)).mkdir(parents=True, exist_ok=True)

  return train_fn, calls


def test_trial_ends_at_its_last_whole_epoch_when_max_steps_stops_it(tmp_path):
  # As :quick's train.max_steps=20 does after 2 epochs of 10 steps: the third call adds no epoch.
  train_fn, calls = fake_train({1, 2})
  config = config_schema.load_config('configs/tune_mnist.py')
  study = tune.run_search(config, tmp_path, 1, max_epochs=7, train_fn=train_fn, pruner=optuna.pruners.NopPruner())
  (trial,) = study.trials
  assert calls == [(1, False), (2, False), (3, False), (2, True)] and trial.state == tune.TrialState.COMPLETE
  assert trial.intermediate_values == {1: 0.1, 2: 0.2} and trial.value == 0.2
  assert trial.user_attrs['test_accuracy'] == 0.02  # evaluated at epoch 2, the last whole one


def test_val_records_past_the_last_checkpoint_are_not_counted(tmp_path):
  # Killed between epoch 2's val record and its checkpoint: epoch 2 is trained again.
  train_fn, _ = fake_train({1, 2}, checkpoint_epochs={1})
  for epoch in (1, 2):
    config = config_schema.load_config('configs/tune_mnist.py')
    config.train.num_epochs = epoch
    train_fn(config, tmp_path / 'run', test=False)
  assert tune.epoch_val_accuracy(tmp_path / 'run') == {1: 0.1}
  assert tune.epoch_val_accuracy(tmp_path / 'none') == {}
