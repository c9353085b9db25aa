"""Fig. 5b's "none" (REST ablated) vs "pt" (plus the PT clamp) over seeds 5-9.

BUILD_NOTES.md "PT clamp at full scale" has the results.

  .venv/bin/python -m ih_jax.experiments.pt_seeds FEATURES WORKDIR
FEATURES as experiments.reproduce's --features (e.g. gaussian, relu, omniglot_conv).
Full scale (lr 1e-5, 600k sequences, eval every 5000). Heads per seed come from that
seed's own 1e6-sequence main run (ih_jax.experiments.paper.study: STRONGEST = highest final
induction strength in layer 2, PT head = highest PT score in layer 1), as the registry's
5b entry does; the main runs of seeds 5-9 share one program without dense checkpoints.
Rerun the same command to resume / reuse.
"""
import json
import math
import os
import sys

from ih_jax.experiments.paper import scales
from ih_jax.experiments.paper.study import Study, learning_times

SEEDS = (5, 6, 7, 8, 9)


class PTStudy(Study):
  """A full-scale Study whose main runs of seeds 5-9 share one program."""

  def main_location(self, seed: int):  # one 5-seed stage, no dense checkpoints
    """(stage "seeds", its config, run index) of `seed`'s main run, without dense checkpoints."""
    return "seeds", self.main_config(SEEDS, dense=False), SEEDS.index(seed)


def main(features: str, root: str) -> None:
  """Trains "none" and "pt" for each seed on its own heads; writes ROOT/pt_summary.json
  with their learning times."""
  st = PTStudy(root, scales.get("full"), features)
  out = {}
  for seed in SEEDS:
    h = st.heads(seed)
    S, P = f"L2H{h['strongest']}", f"L1H{h['pt_order'][0]}"
    cfg = st.config(paper_seqs=600_000, paper_eval_every=5000,
                    conditions=(f"none=keep_only:{S}", f"pt=pt:{P};keep_only:{S}"),
                    seeds=(seed,), ckpt_every=0)
    lts = {k[0]: v for k, v in learning_times(st.stage(f"pt_s{seed}", cfg)).items()}
    out[seed] = dict(strongest=S, pt=P, none=lts["none"], pt_lt=lts["pt"])
    print(f"[pt_seeds] {features} seed {seed}: {out[seed]}", flush=True)
    with open(os.path.join(root, "pt_summary.json"), "w") as f:
      json.dump({str(k): {kk: (None if isinstance(vv, float) and math.isnan(vv) else vv)
                          for kk, vv in v.items()} for k, v in out.items()}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
