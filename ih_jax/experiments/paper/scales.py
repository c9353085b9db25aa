"""How big a reproduction is: the paper's settings ("full") or a CPU-sized version ("quick").

"medium" is quick with twice the length and five seeds. "quick" keeps every experiment's structure (conditions, head choices, comparisons)
but trains with a 10x learning rate (1e-4) for 15% of the paper's sequences, with
fewer extra seeds and smaller eval/analysis sets. At 1e-4 the main run's plateau
still sits near ln 2 and ends in an abrupt drop, ~7x earlier: the `lr_law` entry,
measured at full length (1e6 sequences, init seeds 5-7), gives median learning times
365,024 at 1e-5 and 50,016 at 1e-4 (7.3x; per seed 440,000 / 315,008 / 365,024 against
60,000 / 35,008 / 50,016); learning time goes as ~1/lr below 5e-5 and flattens above
1e-4 (docs/reproduction.md). Verdicts at quick
scale are about the same qualitative claims, not the paper's numbers.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scale:
  """One reproduction scale: learning rate, length, extra seeds, and eval / analysis sizes."""
  name: str
  learning_rate: float
  length: float                 # fraction of the paper's sequence counts
  extra_seeds: tuple[int, ...]  # App. 18 (and graft donors): seeds besides 5
  eval_size: int                # sequences per eval set
  main_ckpt_every: int          # the main run's dense checkpoints (paper: 1000)
  clamp_ckpt_every: int         # the clamp baseline's checkpoints (paper: 1000)
  dense_size: int | None        # analysis set size (None = the full 78,400)
  head_size: int                # dense sequences used to pick STRONGEST / PT heads
  wiring_size: int
  num_checkpoints: int          # checkpoints analysed along a run (paper: 100)

  def seqs(self, paper_seqs: int) -> int:
    """A paper sequence count at this scale: rounded to 1000s, at least 3200."""
    return max(3200, int(round(paper_seqs * self.length / 1000)) * 1000)

  def every(self, paper_every: int) -> int:
    """Eval period: the paper's, shrunk with the length (at least 500 sequences)."""
    return max(500, int(round(paper_every * min(1.0, self.length * 2) / 100)) * 100)


SCALES = {
    "full": Scale("full", 1e-5, 1.0, (6, 7, 8, 9), 1000, 1000, 1000, None, 8192, 4096, 100),
    "quick": Scale("quick", 1e-4, 0.15, (6, 7), 500, 1500, 1000, 8192, 4096, 2048, 40),
    # quick's learning rate with twice its length and five seeds: for the questions
    # beyond the paper where seed-to-seed spread and late learners matter.
    "medium": Scale("medium", 1e-4, 0.3, (6, 7, 8, 9), 500, 3000, 1000, 8192, 4096, 2048, 40),
    # Tests only: every stage runs, nothing is expected to learn.
    "smoke": Scale("smoke", 1e-4, 0.004, (6,), 100, 1000, 1000, 512, 512, 256, 4),
}


def get(name: str) -> Scale:
  """The scale named `name` (a ValueError lists the allowed ones)."""
  if name not in SCALES:
    raise ValueError(f"unknown scale {name!r}; allowed: {sorted(SCALES)}")
  return SCALES[name]
