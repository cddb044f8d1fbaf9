"""The `--config=FILE.py:ARG` suffix: every config parses it strictly through base.parse_arg."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from configs import base
from normjax import config_schema
from normjax.errors import ConfigError

CONFIGS = sorted(p for p in pathlib.Path('configs').glob('*.py') if p.stem != '__init__')

# Each config's allowed keys, in the order its spec lists them (the error lists them so).
_SCRATCH = ('batch', 'cpu', 'quick', 'lambda')
ALLOWED = {
    'base': ('quick',),
    **{f'{norm}_{clip}': ('quick',) for norm in ('bn', 'ln', 'frn') for clip in ('noclip', 'clip')},
    'bn_agc': ('quick',), 'frn_agc': ('quick',), 'gn_noclip': ('quick',), 'tune_mnist': ('quick',),
    'bn_scratch': _SCRATCH, 'nf_agc_scratch': _SCRATCH,
    'batch_sensitivity': ('norm', 'batch', 'quick'),
    'smoke': ('quick',), 'lightcnn_fmnist': ('quick',), 'lightcnn_mnist': ('quick',),
    'mnist_mlp': ('quick',), 'mnist_lenet': ('quick',), 'mnist_medium_light': ('quick',),
    'mnist_ultra_light': ('quick',), 'cnn_mnist': ('quick',),
}


def load(path, arg=''):
  return config_schema.load_config(f'{path}:{arg}' if arg else str(path))


def test_every_config_file_has_an_entry_here():
  assert {p.stem for p in CONFIGS} == set(ALLOWED)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_unknown_argument_names_config_key_and_allowed_keys(path):
  with pytest.raises(ConfigError) as e:
    load(path, 'quick,nosuch=8')
  assert str(e.value) == (f"configs/{path.name}:quick,nosuch=8: unknown argument 'nosuch'; "
                          f"allowed: {', '.join(ALLOWED[path.stem])}")
  # A typo of each allowed key fails too, bare or with a value.
  for key in ALLOWED[path.stem]:
    for typo, arg in ((key[:-1], key[:-1]), (f'{key}x', f'{key}x=1')):
      with pytest.raises(ConfigError, match=f"unknown argument '{typo}'"):
        load(path, arg)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_quick_shrinks_the_run_and_false_is_the_default(path):
  default, quick = load(path), load(path, 'quick')
  assert default.train.max_steps == 0 and quick.train.max_steps == 20
  assert quick.model.pretrained == 'none' and quick.data.name != 'cifar10'
  assert load(path, 'quick=false').to_dict() == default.to_dict()
  assert load(path, 'quick=true').to_dict() == quick.to_dict()


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_every_allowed_key_is_documented(path):
  module = ast.parse(path.read_text())
  docs = ast.get_docstring(module) or ''
  docs += ''.join(ast.get_docstring(n) or '' for n in module.body if isinstance(n, ast.FunctionDef)
                  and n.name == 'get_config')
  for key in ALLOWED[path.stem]:
    assert re.search(rf'\b{key}\b', docs), f'{path}: argument {key!r} is not in its docstring'


@pytest.mark.parametrize('name', ['bn_scratch', 'nf_agc_scratch'])
def test_scratch_arguments_take_effect_with_their_types(name):
  path = f'configs/{name}.py'
  default = load(path)
  assert (default.train.batch_size, default.model.width_mult, default.data.train_subset) == (128, 1.0, 0)
  assert default.optim.agc_lambda == base.agc_lambda_for_batch(128) == 0.08
  config = load(path, 'batch=8')
  assert config.train.batch_size == 8 and isinstance(config.train.batch_size, int)
  assert config.optim.lr == 0.1 * 8 / 256 and config.optim.agc_lambda == 0.16  # lambda follows batch
  config = load(path, 'batch=64,lambda=0.05')
  assert config.optim.agc_lambda == 0.05 and isinstance(config.optim.agc_lambda, float)
  config = load(path, 'cpu')
  assert (config.model.width_mult, config.data.train_subset, config.train.num_epochs) == (0.5, 4000, 3)
  assert config.train.max_steps == 0  # cpu alone is not quick
  assert load(path, 'cpu,quick').train.max_steps == 20


@pytest.mark.parametrize('arg,message', [
    ('batch=x', "configs/bn_scratch.py:batch=x: argument 'batch' = 'x': expected an integer"),
    ('lambda=big', "argument 'lambda' = 'big': expected a number"),
    ('batch', "argument 'batch' needs a value (batch=...); allowed: batch, cpu, quick, lambda"),
    ('cpu=maybe', "argument 'cpu' = 'maybe': expected true or false"),
    ('cpu,batch=8,cpu', "configs/bn_scratch.py:cpu,batch=8,cpu: argument 'cpu' given twice"),
])
def test_bad_values_are_refused(arg, message):
  with pytest.raises(ConfigError) as e:
    load('configs/bn_scratch.py', arg)
  assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('spec,message', [
    # The three silent mistakes this parser exists to catch.
    ('configs/bn_clip.py:quick,batch=8', "configs/bn_clip.py:quick,batch=8: unknown argument 'batch'; allowed: quick"),
    ('configs/nf_agc_scratch.py:bach=8', "unknown argument 'bach'; allowed: batch, cpu, quick, lambda"),
    ('configs/smoke.py:quik', "configs/smoke.py:quik: unknown argument 'quik'; allowed: quick"),
])
def test_reported_silent_mistakes_now_fail(spec, message):
  with pytest.raises(ConfigError) as e:
    config_schema.load_config(spec)
  assert message in str(e.value)


def test_parse_arg_converts_to_the_default_type():
  args = base.parse_arg('n=3,x=0.5,s=hello,flag,off=0', 'configs/f.py', n=1, x=0.1, s='', flag=False,
                        off=True, opt=(None, float), kept=7)
  assert args.to_dict() == {'n': 3, 'x': 0.5, 's': 'hello', 'flag': True, 'off': False, 'opt': None,
                            'kept': 7}
  assert type(args.n) is int and type(args.x) is float
  assert base.parse_arg('opt=2', 'configs/f.py', opt=(None, float)).opt == 2.0
  assert base.parse_arg(None, 'configs/f.py', quick=False).quick is False
  assert base.parse_arg('', 'configs/f.py', quick=False).quick is False
  with pytest.raises(ConfigError, match=r"^configs/f.py:a: unknown argument 'a'; allowed: \(no arguments\)$"):
    base.parse_arg('a', 'configs/f.py')


def test_cli_reports_an_unknown_argument_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'normjax.main', '--config=configs/smoke.py:quik', f'--workdir={tmp_path}'],
      capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == "normjax: error: configs/smoke.py:quik: unknown argument 'quik'; allowed: quick"
  assert not (tmp_path / 'config.json').exists()
