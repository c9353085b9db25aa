"""Data: feature tables, splits, the on-device sampler and fixed eval / analysis sets."""
from ih_jax.data.evalsets import PAPER_EVALUATORS, EvaluatorConfig, dense_indices, make_eval_indices
from ih_jax.data.features import FeatureConfig, load_features, synthetic_features
from ih_jax.data.sampler import Batch, SamplerSpec, SequenceIndices, gather_features, sample_batch, sample_indices
from ih_jax.data.splits import Splits, make_splits, relabel_pairs
