"""Short error messages for the absl entry points in ih_jax/experiments/ (`cli.run(main)`).

A user error (a bad flag or config value, a refused clamp spec, a missing file, a
diverged run) is printed as one line naming the problem, plus one hint line, and the
process exits with status 1, instead of a 20-55-line traceback. Errors of any other
type are bugs and keep their traceback. Set IH_JAX_TRACEBACK=1 (or pass
--verbosity=1, for errors raised after the flags parsed) to get every traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app, flags

TRACEBACK_ENV = "IH_JAX_TRACEBACK"
_HINT = f"(set {TRACEBACK_ENV}=1 or pass --verbosity=1 for the traceback)"
_FLAG_HINT = f"(--helpshort lists the flags; set {TRACEBACK_ENV}=1 for the traceback)"
# Errors that describe bad input rather than a bug in ih_jax.
_USER_ERRORS = (ValueError, OSError, FloatingPointError, app.UsageError)
_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')


_PLUGINS = flags.DEFINE_list(
    "plugins", [], "Your own modules to import first (they register intervention kinds or "
    "head scores): module names (my_lab.kinds) or .py files (path/to/my_kinds.py).")


# Several processes share one sweep (ih_jax.distributed; docs/multihost.md).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Several processes, one sweep: HOST:PORT of process 0 (with "
    "--num_processes and --process_id). The runs are sharded over every process's devices.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes share the sweep.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. "
                                   "num_processes - 1 (process 0 writes the files).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed with settings detected from the cluster "
    "(SLURM, Open MPI, a Cloud TPU pod slice) instead of the three flags above.")


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with short messages for flag errors and user errors; the
  --plugins modules are imported and jax.distributed is started (when asked) before
  `main` runs."""
  app.run(_guarded(main), flags_parser=_parse_flags)


def load_plugins(names: Sequence[str]) -> None:
  """Imports each module name or .py file (running its register(...) calls)."""
  for name in names:
    if name.endswith(".py"):
      if not os.path.isfile(name):
        raise ValueError(f"--plugins: no file {name!r}")
      mod_name = "ih_jax_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(name))[0])
      spec = importlib.util.spec_from_file_location(mod_name, name)
      module = importlib.util.module_from_spec(spec)
      sys.modules[mod_name] = module
      spec.loader.exec_module(module)
    else:
      try:
        importlib.import_module(name)
      except ModuleNotFoundError as e:
        raise ValueError(f"--plugins: cannot import module {name!r} ({e}); give a module on "
                         "the Python path or a .py file") from e


def start_distributed(main: Callable[[list[str]], Any]) -> None:
  """jax.distributed.initialize from the flags, if any of them is given; only for
  launchers whose module sets MULTIPROCESS = True (train, sweep)."""
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or any(v is not None for v in given):
    if not getattr(sys.modules.get(main.__module__), "MULTIPROCESS", False):
      raise app.UsageError(
          "--coordinator_address / --num_processes / --process_id / --distributed: only "
          "`ih-jax train` and `ih-jax sweep` run as several processes; run this command "
          "as one process (e.g. on the sweep's finished workdir)")
    from ih_jax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(*given)


def _want_traceback() -> bool:
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  fl = flags.FLAGS
  return fl.is_parsed() and "verbosity" in fl and fl["verbosity"].present and fl.verbosity >= 1


def _fail(message: str, hint: str = _HINT) -> None:
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ih_jax"
  sys.stderr.write(f"{prog}: error: {message}\n{hint}\n")
  sys.stderr.flush()
  sys.exit(1)


def _guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  def wrapped(argv: list[str]) -> Any:
    try:
      start_distributed(main)
      load_plugins(_PLUGINS.value)
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      ih_jax_error = type(e).__module__.startswith("ih_jax")  # e.g. CheckpointError
      if _want_traceback() or not (isinstance(e, _USER_ERRORS) or ih_jax_error):
        raise
      _fail(short_message(e))
  return wrapped


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_names() -> list[str]:
  """The configs shipped with ih_jax, addressable as --config=NAME[:ARGS]."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def resolve_config_arg(value: str) -> str:
  """--config's value with a shipped config's name (`tiny`, `clamps:head=3`) replaced by
  its file; a path to an existing .py file is kept. Raises ValueError otherwise."""
  path, sep, arg = value.partition(":")
  if os.path.isfile(path):
    return value
  if path in config_names():
    return os.path.join(CONFIG_DIR, path + ".py") + sep + arg
  raise ValueError(f"--config={value}: {path!r} is neither a config file nor a shipped "
                   f"config; shipped configs: {', '.join(config_names())}")


def _resolve_config_flag(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config_arg(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_arg(out[i + 1])
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override errors (typos, bad config files) short;
  --config may name a shipped config instead of a file."""
  try:
    if "config" in flags.FLAGS:
      argv = _resolve_config_flag(argv)
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
      raise
    _fail(f"bad flag: {short_message(e, argv)}", _FLAG_HINT)
  return []  # unreachable: _fail exits


def short_message(e: BaseException, argv: list[str] | None = None) -> str:
  """One line for an exception: its message, without nested tracebacks or escapes."""
  text = _innermost_text(e)
  m = _DID_YOU_MEAN.search(text)
  if isinstance(e, (KeyError, AttributeError)) or m:  # an unknown --config.<field>
    key = m.group(2) if m else (text.strip().splitlines() or [""])[0].strip("'\"")
    flag = _flag_naming(key, argv or [])
    where = f" in {flag}" if flag else ""
    return (f"unknown config field {key!r}{where}"
            + (f"; did you mean {m.group(1)!r}?" if m else ""))
  if "Traceback (most recent call last)" in text:  # ml_collections embeds one
    head, _, tail = text.partition("Traceback (most recent call last)")
    last = [l.strip() for l in tail.splitlines() if l.strip()][-1:]
    text = " ".join([head.strip().rstrip(":") + ":"] + last)
  return " ".join(l.strip() for l in text.splitlines() if l.strip()) or type(e).__name__


def _innermost_text(e: BaseException) -> str:
  """The message, unwrapping ml_collections' AttributeError(KeyError(msg)) and its repr."""
  while e.args and (isinstance(e, (KeyError, AttributeError))
                    or isinstance(e.args[0], BaseException)):
    if not isinstance(e.args[0], BaseException):
      return _unescape(str(e.args[0]))  # str(KeyError) would repr the message
    e = e.args[0]
  return _unescape(str(e))


def _unescape(text: str) -> str:
  # A repr'd message inside a flag error: unescape so "did you mean" reads plainly.
  return text.replace("\\n", "\n").replace("\\'", "'")


def _flag_naming(key: str, argv: list[str]) -> str | None:
  for a in argv[1:]:
    name = a.split("=", 1)[0]
    if name.startswith("--") and key in name.lstrip("-").split("."):
      return name
  return None
