r"""Train a seed x condition (x data grid) sweep; the same launcher as experiments.train.

The grid is part of the config: `sweep.conditions` x `sweep.init_seeds` x every
`sweep.grid` axis. Runs that can share a compiled program do (one vmapped program,
sharded over the local devices when there are several); the rest are grouped
into separate programs under --workdir/program_<k>/ (see ih_jax/sweep.py).

  # Fig. 5b conditions x 2 seeds in one program:
  ih-jax sweep --config=clamps:head=0 \
      --config.sweep.init_seeds="(5,6)" --workdir=/tmp/ih_clamp_sweep
  # Two feature families in one program, two label counts as two programs:
  ih-jax sweep --config=main \
      --config.sweep.grid="('data.rho=0.7,0.8','model.num_labels=5,10')" --workdir=/tmp/ih_grid

Kill it at any point and rerun the same command to resume.

Several processes (one per host, or several on one machine) can share one sweep: the
runs are sharded over every process's devices and process 0 writes the files.

  # on host A (10.0.0.1) and host B, the workdir on a filesystem both see:
  ih-jax sweep --config=main --config.sweep.init_seeds="(5,6,7,8)" --workdir=/shared/s \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=0   # 1 on B

SLURM / Open MPI / Cloud TPU pod slices: --distributed detects the settings
(docs/multihost.md).
"""

from ih_jax.experiments import cli
from ih_jax.experiments import train as train_launcher

main = train_launcher.main  # the same flags and main as `ih-jax train`

if __name__ == "__main__":
  cli.run(main)
