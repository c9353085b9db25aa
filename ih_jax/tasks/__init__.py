"""Tasks: what the model reads and predicts, and how batches are drawn, scored and
evaluated (see `core.Task`). Built-ins: "fewshot" (the paper's), "tokens" (token-level
induction); `SequenceTask` is the base of any next-token task of your own."""

from __future__ import annotations

from typing import Any

from ih_jax.tasks.core import (FAMILIES, Forward, Task, TaskData, get, names, register,
                               unregister)
from ih_jax.tasks.fewshot import FewShotTask
from ih_jax.tasks.sequence import SequenceTask
from ih_jax.tasks.tokens import TokenTask

__all__ = ["FAMILIES", "FewShotTask", "Forward", "SequenceTask", "Task", "TaskData",
           "TokenTask", "for_config", "for_model", "get", "names", "register", "unregister"]


def for_config(cfg: Any) -> Task:
  """The task of an ExperimentConfig (`cfg.task.kind`), built from it."""
  return get(cfg.task.kind)(cfg)


def for_model(model_cfg: Any, num_context: int = 2, seq_len: int = 32) -> Task:
  """The built-in task a ModelConfig implies when the model is used on its own (no
  ExperimentConfig): tokens with a vocabulary (vocab_size > 0), else few-shot."""
  if model_cfg.vocab_size > 0:
    return TokenTask(None, seq_len=seq_len)
  return FewShotTask(None, num_context=num_context)
