"""Schedule arithmetic in sequences seen."""
import pytest

from ih_jax import schedule


def _seqs(steps, batch=32):
  return [s * batch for s in steps]


def test_units():
  assert schedule.num_steps(1_000_000, 32) == 31_250
  assert schedule.num_steps(1_000_001, 32) == 31_251
  assert schedule.num_steps(32, 32) == 1


def test_period_5000():
  seqs = _seqs(schedule.eval_steps(5000, 1_000_000, 32))
  assert seqs[:4] == [0, 5024, 10016, 15008]
  assert seqs[-2:] == [995008, 1_000_000]  # last periodic point 995000, then the final one
  assert len(seqs) == 201


def test_period_1000():
  seqs = _seqs(schedule.eval_steps(1000, 300_000, 32))
  assert seqs[:3] == [0, 1024, 2016]
  assert seqs[-1] == 300_000
  assert len(seqs) == 301
  assert seqs == sorted(set(seqs))


def test_final_point_always_present():
  assert schedule.eval_steps(10**9, 100_000, 32) == [0, 3125]
  # Ragged length: final point is ceil(num_seqs / B) updates.
  assert schedule.eval_steps(1000, 2050, 32)[-1] == 65


def test_small_period_merges_duplicates():
  steps = schedule.eval_steps(10, 320, 32)
  assert steps == list(range(11))
  assert schedule.eval_steps(1, 96, 32) == [0, 1, 2, 3]


def test_periodic_points():
  assert schedule.periodic_points(5000, 15_000) == [0, 5000, 10_000]
  assert schedule.periodic_points(5000, 15_001) == [0, 5000, 10_000, 15_000]


def test_steps_for_points_caps_and_sorts():
  assert schedule.steps_for_points([5000, 0, 5000, 2_000_000], 10_000, 32) == [0, 157, 313]


@pytest.mark.parametrize("args", [(0, 32), (-5, 32), (100, 0), (100, -1)])
def test_num_steps_errors(args):
  with pytest.raises(ValueError, match="positive"):
    schedule.num_steps(*args)


@pytest.mark.parametrize("every", [0, -1000])
def test_period_errors(every):
  with pytest.raises(ValueError, match="period must be positive"):
    schedule.eval_steps(every, 1000, 32)
