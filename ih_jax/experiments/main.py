"""The `ih-jax` command: one entry point for the launchers in ih_jax.experiments.

  ih-jax train --config=tiny --workdir=/tmp/ih_tiny       # a shipped config, by name
  ih-jax train --config=my_config.py:arg --workdir=...    # or your own config file
  ih-jax sweep | analyze | reproduce | bench ...          # `ih-jax COMMAND --help` for flags

Each command is the module `python -m ih_jax.experiments.COMMAND` runs; only the chosen
module is imported, so its flags are the only ones defined.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from ih_jax.experiments import cli

COMMANDS = {
    "train": ("ih_jax.experiments.train", "train a sweep of runs from a config"),
    "sweep": ("ih_jax.experiments.sweep", "the same launcher, for seed x condition x grid sweeps"),
    "analyze": ("ih_jax.experiments.analyze", "the paper's analyses of a finished workdir"),
    "reproduce": ("ih_jax.experiments.reproduce", "a paper figure (or all) with its REPORT.md"),
    "bench": ("ih_jax.experiments.bench", "training throughput against naive baselines"),
}


def usage() -> str:
  """The usage text: every command and the shipped config names."""
  lines = ["usage: ih-jax COMMAND [flags]   (ih-jax COMMAND --help lists its flags)", "",
           "commands:"]
  lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
  lines += ["", f"shipped configs (--config=NAME[:ARGS]): {', '.join(cli.config_names())}"]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Dispatches `ih-jax COMMAND [flags]` to the command's module (help and unknown
  commands print the usage)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    sys.stderr.write(f"ih-jax: error: unknown command {command!r}; one of "
                     f"{', '.join(COMMANDS)}\n")
    sys.exit(2)
  module_name = COMMANDS[command][0]
  module = importlib.import_module(module_name)
  sys.argv = [f"ih-jax {command}"] + argv[2:]
  if command == "bench":  # argparse, not absl
    module.main()
  elif any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[2:]):
    # absl's own --help lists the flags of the __main__ module, which is this dispatcher.
    print(_command_help(module, module_name, command))
    sys.exit(0)
  else:
    cli.run(module.main)


def _command_help(module, module_name: str, command: str) -> str:
  """The command's docstring and its flags (absl's help for the module that defines them)."""
  fl = flags.FLAGS
  own = fl.module_help(module_name)
  if not own.strip() and getattr(module, "main", None) is not None:
    own = fl.module_help(module.main.__module__)  # sweep: the train launcher's flags
  text = [(module.__doc__ or "").strip(), "", f"flags of ih-jax {command}:", own,
          fl.module_help(cli.__name__), "", "--helpfull lists absl's own flags too."]
  return "\n".join(text)


if __name__ == "__main__":
  main()
