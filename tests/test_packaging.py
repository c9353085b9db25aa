"""The distribution: a wheel holds the library, the `ih-jax` command and its configs, and
runs outside the repository; `--config` takes a shipped config's name."""
import csv
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from ih_jax.experiments import cli, main as ih_jax_main

# One worker builds this module's shared runs (a session-scoped fixture, so tests of other
# modules run in between do not tear it down): `make test` passes --dist loadgroup.
pytestmark = pytest.mark.xdist_group("test_packaging")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def test_config_names_resolve_to_shipped_files_and_bad_names_are_refused(tmp_path):
  assert {"main", "tiny", "clamps", "tokens", "omniglot", "chan"} <= set(cli.config_names())
  path, _, arg = cli.resolve_config_arg("clamps:head=3").partition(":")
  assert os.path.isfile(path) and path.endswith(os.path.join("configs", "clamps.py"))
  assert arg == "head=3"
  own = tmp_path / "mine.py"
  own.write_text("")
  assert cli.resolve_config_arg(f"{own}:x=1") == f"{own}:x=1"  # a file stays a file
  with pytest.raises(ValueError, match="'nope' is neither.*shipped configs: chan, clamps"):
    cli.resolve_config_arg("nope")


def test_ih_jax_command_lists_commands_and_refuses_unknown_ones(capsys):
  with pytest.raises(SystemExit) as e:
    ih_jax_main.main(["ih-jax", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert all(c in out for c in ("train", "sweep", "analyze", "reproduce", "bench", "tiny"))
  with pytest.raises(SystemExit) as e:
    ih_jax_main.main(["ih-jax", "trian"])
  assert e.value.code == 2
  assert "unknown command 'trian'; one of train, sweep" in capsys.readouterr().err


FLAG_OF = {"train": "--workdir", "sweep": "--config", "analyze": "--num_checkpoints",
           "reproduce": "--figure", "bench": "--runs"}


@pytest.mark.parametrize("command", sorted(FLAG_OF))
def test_every_command_answers_help_with_its_own_flags(command):
  assert set(FLAG_OF) == set(ih_jax_main.COMMANDS)
  out = subprocess.run([sys.executable, "-m", "ih_jax.experiments.main", command, "--help"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert FLAG_OF[command] in out.stdout, out.stdout[-2000:]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
  """Builds the wheel from a copy of the sources (no build/ left in the checkout)."""
  src = tmp_path_factory.mktemp("src")
  for f in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(os.path.join(ROOT, f), src / f)
  shutil.copytree(os.path.join(ROOT, "ih_jax"), src / "ih_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
  out = tmp_path_factory.mktemp("dist")
  # No build isolation: the build backend (setuptools) comes from the test extras, so
  # nothing is downloaded.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), str(src)], check=True, capture_output=True)
  (whl,) = out.glob("ih_jax-*.whl")
  return whl


def test_wheel_holds_library_command_configs_and_license(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  for module in ("ih_jax/api.py", "ih_jax/model.py", "ih_jax/experiments/main.py",
                 "ih_jax/experiments/train.py", "ih_jax/experiments/paper/registry.py",
                 "ih_jax/experiments/configs/tiny.py", "ih_jax/experiments/configs/main.py"):
    assert module in names, module
  assert not any(n.startswith(("tests/", "notebooks/")) for n in names)
  dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
  assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names)
  entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
  assert "ih-jax = ih_jax.experiments.main:main" in entry_points


def test_wheel_install_trains_the_tiny_config_outside_the_repo(wheel, tmp_path):
  """Installed into a bare folder (its dependencies are this venv's) and run from a
  folder outside the checkout: `ih-jax train --config=tiny`, then ih_jax.load."""
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                  str(target), str(wheel)], check=True, capture_output=True)
  env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
  work = tmp_path / "elsewhere"
  work.mkdir()
  run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,  # noqa: E731
                                     timeout=600)
  where = run(sys.executable, "-c", "import ih_jax; print(ih_jax.__file__)")
  assert where.stdout.strip().startswith(str(target)), (where.stdout, where.stderr)
  out = run(str(target / "bin" / "ih-jax"), "train", "--config=tiny", "--workdir=wd",
            "--config.train.num_seqs=1024", "--config.train.eval_every=512",
            "--config.sweep.conditions=('none',)", "--config.sweep.init_seeds=(5,)", "--noplot")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "run 0 none seed 5: final fsl_train loss" in out.stdout
  with open(work / "wd" / "metrics.csv") as f:
    seqs = sorted({int(r["seqs"]) for r in csv.DictReader(f)})
  assert seqs == [0, 512, 1024]
  loaded = run(sys.executable, "-c", "import ih_jax; s = ih_jax.load('wd'); "
               "print(s.conditions, s.seeds, s.run('none', 5).metrics('fsl_train')['seqs'])")
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  assert "['none'] [5] [   0  512 1024]" in loaded.stdout
