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
  module = importlib.import_module(COMMANDS[command][0])
  sys.argv = [f"ih-jax {command}"] + argv[2:]
  if command == "bench":  # argparse, not absl
    module.main()
  else:
    cli.run(module.main)


if __name__ == "__main__":
  main()
