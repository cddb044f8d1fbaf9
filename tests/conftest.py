"""Shared pytest fixtures."""
import os
import pathlib

import pytest

from normjax.data import pipeline


@pytest.fixture(scope='session')
def shared_data_dir() -> pathlib.Path:
  """The offline datasets folder (cifar10-jpeg.tar.gz, fashion-mnist/), from the env."""
  path = os.environ.get(pipeline.ENV_DATA_DIR)
  if not path:
    pytest.fail(f'Set {pipeline.ENV_DATA_DIR} to the folder holding cifar10-jpeg.tar.gz '
                'and fashion-mnist/ (the project\'s shared/data) to run the real-data tests.')
  if not pathlib.Path(path).is_dir():
    pytest.fail(f'{pipeline.ENV_DATA_DIR}={path!r} is not a directory.')
  return pathlib.Path(path).absolute()  # CI gives ../shared/data; tests chdir and symlink


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A tfds data_dir for this session, so each real dataset is prepared once."""
  return tmp_path_factory.mktemp('tfds')



@pytest.fixture
def tf_blocker(tmp_path) -> pathlib.Path:
  """A folder for PYTHONPATH whose sitecustomize hides tensorflow from the path finder, so imports
  and find_spec see it exactly as not installed."""
  blocker = tmp_path / 'block'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(
      'import sys\n'
      'from importlib.machinery import PathFinder\n'
      'class HideTF(PathFinder):\n'
      '  @classmethod\n'
      '  def find_spec(cls, name, path=None, target=None):\n'
      '    if name == "tensorflow" or name.startswith("tensorflow."):\n'
      '      return None\n'
      '    return super().find_spec(name, path, target)\n'
      'sys.meta_path = [HideTF if f is PathFinder else f for f in sys.meta_path]\n')
  return blocker
