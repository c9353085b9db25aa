"""Shared pieces of the ml_collections configs (the library itself never imports this)."""

from __future__ import annotations

import ml_collections

from ih_jax.config import ExperimentConfig


def base_config() -> ml_collections.ConfigDict:
  """The paper's settings as a ConfigDict (see ih_jax/config.py for every field)."""
  d = ExperimentConfig().to_dict()
  d["evaluators"] = [dict(e) for e in d["evaluators"]]
  return ml_collections.ConfigDict(d)


def parse_arg(arg: str | None) -> dict[str, str]:
  """'k=v,k2=v2' (the part after ':' in --config=path.py:...) -> dict."""
  out = {}
  for item in (arg or "").split(","):
    if item.strip():
      k, sep, v = item.partition("=")
      if not sep:
        raise ValueError(f"config argument {item!r} must look like key=value")
      out[k.strip()] = v.strip()
  return out


def to_experiment(cfg: ml_collections.ConfigDict) -> ExperimentConfig:
  """The ExperimentConfig of a ConfigDict (unknown keys are errors)."""
  return ExperimentConfig.from_dict(cfg.to_dict())

