r"""Fig. 5b-style clamp conditions, all trained in one vmapped program.

Every condition except "copy" ablates the other layer-2 heads (REST), so only the
chosen head HEAD (paper numbering L2H<head>) and layer 1 can learn. The paper picks
the strongest induction head of the seed's main run; pass it as `head=`.
Arguments: head, pt (the PT clamp's layer-1 head), num_seqs, ckpt_every (0 = final only).

  ih-jax train --config=clamps:head=3 \
      --workdir=/tmp/ih_clamps
  ih-jax train --config=clamps:head=3,pt=0,ckpt_every=0 \
      --config.sweep.init_seeds="(5,6)" --workdir=/tmp/ih_clamps_2seeds
"""

from ih_jax.experiments.configs import common


def conditions(head: int, pt_head: int) -> tuple[str, ...]:
  """The six Fig. 5b conditions for layer-2 head `head` and layer-1 PT head `pt_head`:
  none, pt, perfect_l1, match, copy, l1_copy (all but the copy ones ablate REST)."""
  h = f"L2H{head}"
  return (
      f"none=keep_only:{h}",
      f"pt=pt:L1H{pt_head};keep_only:{h}",
      f"perfect_l1=perfect_l1;keep_only:{h}",
      f"match=ih:{h};keep_only:{h}",
      f"copy=copy:{h}",
      f"l1_copy=perfect_l1;copy:{h}",
  )


def get_config(arg: str | None = None):
  """The clamp conditions in one program, seed 5, 600k sequences (see the module docstring)."""
  args = common.parse_arg(arg)
  cfg = common.base_config()
  cfg.train.num_seqs = int(float(args.get("num_seqs", 600_000)))
  cfg.train.eval_every = 1000
  cfg.sweep.conditions = conditions(int(args.get("head", 0)), int(args.get("pt", 0)))
  cfg.sweep.init_seeds = (5,)
  # Dense checkpoints: the "None" baseline needs them (progress measures under
  # clamps); the runs share one stacked checkpoint, so all get them.
  cfg.checkpoint.every = int(float(args.get("ckpt_every", 1000)))
  return cfg
