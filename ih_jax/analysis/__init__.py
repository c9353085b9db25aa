"""Analysis of trained runs: progress measures, timing, ablations, composition, toy model."""
