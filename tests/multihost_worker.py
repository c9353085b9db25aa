"""One process of a multi-process `ih-jax sweep`, for tests/test_multihost.py.

Arguments are the sweep's flags. With IH_JAX_TEST_DIE_AFTER_SAVES=N the process dies
(os._exit, no cleanup: as a kill would) right after its N-th resume checkpoint is on
disk, so a test can restart all processes at a known point without timing anything.
"""
import os
import sys

from ih_jax import checkpoint as ckpt_lib
from ih_jax.experiments import cli, sweep

_DIE_AFTER = int(os.environ.get("IH_JAX_TEST_DIE_AFTER_SAVES", "0"))

if _DIE_AFTER:
  _save = ckpt_lib.RunCheckpointer.save
  _count = [0]

  def _save_then_die(self, *args, **kwargs):
    _save(self, *args, **kwargs)
    _count[0] += 1
    if _count[0] == _DIE_AFTER:
      self.wait()
      sys.stdout.flush()
      os._exit(9)  # pylint: disable=protected-access

  ckpt_lib.RunCheckpointer.save = _save_then_die

if __name__ == "__main__":
  sys.argv = ["ih-jax sweep"] + sys.argv[1:]
  cli.run(sweep.main)
