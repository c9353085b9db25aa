"""Typed experiment configuration: from_dict / to_dict."""
import pytest

from ih_jax.config import ExperimentConfig, TaskConfig
from ih_jax.data.evalsets import EvaluatorConfig


def test_from_dict_nested_and_lists_to_tuples():
  cfg = ExperimentConfig.from_dict({
      "model": {"num_labels": 10},
      "data": {"rho": 0.5},
      "task": {"class_split": [100, 1423, 100], "num_context": 4},
      "sweep": {"conditions": ["none", "a=b"], "init_seeds": [5, 6]},
      "evaluators": [{"name": "fsl_train"}, {"name": "x", "classes": "test", "size": 10}],
  })
  assert cfg.model.num_labels == 10 and cfg.model.num_heads == 8
  assert cfg.data.rho == 0.5 and cfg.data.source == "synthetic"
  assert cfg.task == TaskConfig(num_context=4, class_split=(100, 1423, 100))
  assert cfg.sweep.conditions == ("none", "a=b") and cfg.sweep.init_seeds == (5, 6)
  assert cfg.evaluators == (EvaluatorConfig("fsl_train"), EvaluatorConfig("x", classes="test",
                                                                          size=10))
  assert hash(cfg)  # frozen and hashable: no lists left inside
  assert ExperimentConfig.from_dict({}) == ExperimentConfig()


def test_unknown_key_names_key_and_allowed():
  with pytest.raises(ValueError, match=r"'num_seq'.*config\.train.*allowed.*'num_seqs'"):
    ExperimentConfig.from_dict({"train": {"num_seq": 5}})
  with pytest.raises(ValueError, match=r"'modle'.*allowed.*'model'"):
    ExperimentConfig.from_dict({"modle": {}})


@pytest.mark.parametrize("d,where", [
    ({"train": {"num_seqs": "abc"}}, "config.train.num_seqs"),
    ({"train": {"num_seqs": 3.5}}, "config.train.num_seqs"),
    ({"data": {"rho": "high"}}, "config.data.rho"),
    ({"train": {"eval_unclamped": "yes"}}, "config.train.eval_unclamped"),
    ({"task": {"class_split": [50, "x", 100]}}, r"config.task.class_split\[1\]"),
    ({"model": 3}, "config.model"),
])
def test_wrong_types(d, where):
  with pytest.raises(ValueError, match=where):
    ExperimentConfig.from_dict(d)


def test_float_literals_accepted_for_ints():
  cfg = ExperimentConfig.from_dict({"train": {"num_seqs": 3e5, "eval_every": 1e3}})
  assert cfg.train.num_seqs == 300_000 and type(cfg.train.num_seqs) is int
  assert cfg.train.eval_every == 1000 and type(cfg.train.eval_every) is int
  cfg = ExperimentConfig.from_dict({"train": {"learning_rate": 1}})
  assert type(cfg.train.learning_rate) is float


def test_roundtrip():
  cfg = ExperimentConfig.from_dict({
      "train": {"num_seqs": 12_345, "eval_seed": 7},
      "sweep": {"conditions": ["none", "x=y"], "init_seeds": [5, 6, 7]},
      "evaluators": [{"name": "a", "pairs": "val"}],
  })
  assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
  assert ExperimentConfig.from_dict(ExperimentConfig().to_dict()) == ExperimentConfig()
  assert cfg.to_dict()["train"]["num_seqs"] == 12_345


@pytest.mark.parametrize("value", [float("inf"), True])
def test_non_integer_values_for_ints_rejected(value):
  with pytest.raises(ValueError, match="config.train.num_seqs"):
    ExperimentConfig.from_dict({"train": {"num_seqs": value}})


@pytest.mark.parametrize("section,key,value", [("data", "source", 5),
                                               ("sweep", "conditions", [None])])
def test_non_strings_for_str_fields_rejected(section, key, value):
  with pytest.raises(ValueError, match=f"config.{section}.{key}"):
    ExperimentConfig.from_dict({section: {key: value}})
