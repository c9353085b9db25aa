"""Simulated process deaths for resume tests (imported as `import crashes`)."""
from ih_jax import checkpoint as ckpt_lib


class Crash(Exception):
  """Stands in for the process dying right after a checkpoint is on disk."""


def crash_after_saves(monkeypatch, n_saves: int) -> None:
  """The run 'dies' (raises Crash) right after its n-th checkpoint save is on disk."""
  original = ckpt_lib.RunCheckpointer.save
  count = {"n": 0}

  def save(self, *args, **kwargs):
    original(self, *args, **kwargs)
    count["n"] += 1
    if count["n"] == n_saves:
      self.wait()
      self.close()
      raise Crash()
  monkeypatch.setattr(ckpt_lib.RunCheckpointer, "save", save)
