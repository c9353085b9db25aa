"""The compiled program of a sweep: a stack of runs trained and evaluated together.

The leading axis of params / optimizer state / clamps is the runs axis R
(data variant x condition x init seed, variant-major). One jitted call runs a
device-side loop of optimizer steps (data sampled in-graph, no host sync) and
then, when asked, evaluates every run on the fixed eval sets under its own
clamps and (optionally) clamp-free.

Data variants (ih_jax.sweep.PER_RUN_FIELDS) give each group of runs its own
feature table and training stream; with one variant the batch is sampled once
per step and shared by every run. With several devices the runs axis
is sharded over a 1-D mesh ('runs',) and padded to a multiple of the device
count with copies of the last run (their results are dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ih_jax import clamps as clamps_lib
from ih_jax import sweep as sweep_lib
from ih_jax import interventions
from ih_jax.interventions import graft as graft_lib
from ih_jax import freeze as freeze_lib
from ih_jax import model as model_lib
from ih_jax import optim
from ih_jax import tasks as tasks_lib
from ih_jax import warmstart
from ih_jax.config import ExperimentConfig
from ih_jax.data import sampler, splits as splits_lib
from ih_jax.sweep import Program, RunSpec, Variant

# pylint: disable=invalid-name


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a program: its index on the runs axis, condition, clamp spec, seed, variant."""
  index: int
  condition: str   # condition name
  spec: str        # canonical clamp spec (ih_jax.clamps.describe)
  init_seed: int
  variant: str = ""  # data variant name ("" when the sweep has no data grid)


class TrainState(NamedTuple):
  """The training state of every run of a program, stacked on the runs axis."""
  params: Any          # runs-stacked params [R_pad, ...]
  opt_state: Any       # runs-stacked Adam state
  data_key: jax.Array  # [V] training-stream keys, one per data variant
  step: jax.Array      # updates done (int32 scalar)


@dataclasses.dataclass
class Experiment:
  """Everything derived from a program that training and evaluation need."""
  cfg: ExperimentConfig                  # shared settings (the first variant's config)
  variants: tuple[Variant, ...]
  # The task's data per variant (TaskData.data_V): few-shot [V, classes, exemplars, F];
  # [V, 1, 1, 1] for tasks that sample from nothing (the token task).
  features: jax.Array
  splits: splits_lib.Splits | None       # few-shot only (None for other tasks)
  train_spec: sampler.SamplerSpec | None  # few-shot only (None for other tasks)
  # Leaves [V, ...]; few-shot: x is IndexedFeatures; token task: one TokenBatch "tokens".
  eval_batches: dict[str, Any]
  runs: list[Run]                        # the real runs (R)
  run_variant: np.ndarray                # [R_pad] variant index of each (padded) run
  run_init_seeds: np.ndarray             # [R_pad] init seed of each (padded) run
  clamps: clamps_lib.Clamps              # runs-stacked [R_pad, ...], host numpy
  plan: clamps_lib.ClampPlan
  mesh: jax.sharding.Mesh | None = None
  task: tasks_lib.Task | None = None      # the task (ih_jax.tasks), set by setup_experiment

  @property
  def num_padded(self) -> int:
    """R_pad, the length of the runs axis including padding runs."""
    return len(self.run_variant)


def parse_conditions(entries: tuple[str, ...], num_layers: int, num_heads: int,
                     donors: tuple[str, ...] = (), tokens: bool = False,
                     num_seqs: int | None = None, family: str | None = None
                     ) -> list[tuple[str, clamps_lib.Clamps]]:
  """'name=spec' or 'spec' entries -> [(name, clamps)], with unique names.

  `donors` are the graft donor names (`graft_lib.donor_names(cfg)`); `family`: the task
  family (ih_jax.tasks.FAMILIES) the conditions are for; kinds not defined on it are
  refused (`tokens=True` is family "tokens"); `num_seqs`: the run's length, which a
  clamp window must start within.
  """
  family = family or ("tokens" if tokens else "fewshot")
  out, seen = [], set()
  for entry in entries:
    name, sep, spec = entry.partition("=")
    if not sep:
      name, spec = entry.strip(), entry
    name = name.strip()
    try:
      c = clamps_lib.parse(spec, num_layers, num_heads, donors)
    except ValueError as e:
      raise ValueError(f"condition {entry!r}: {e}") from None
    check_family_clamps(c, entry, family)
    for kind, (start, _) in clamps_lib.scheduled(c).items():
      if num_seqs is not None and start >= num_seqs:
        raise ValueError(f"condition {entry!r}: the {kind} window starts at {start:,d}, at or "
                         f"after the end of the run (train.num_seqs={num_seqs:,d})")
    if name in seen:
      raise ValueError(f"duplicate condition name {name!r} in sweep.conditions")
    seen.add(name)
    out.append((name, c))
  if not out:
    raise ValueError("sweep.conditions is empty; use ('none',) for a plain run")
  return out


def check_family_clamps(c: clamps_lib.Clamps, entry: str, family: str) -> None:
  """Refuses clamp kinds that are not defined on the task family (e.g. the few-shot-only
  kinds, which read the label tokens / query row, on a token task)."""
  plan = clamps_lib.plan_for(clamps_lib.stack([c]))
  bad = [kind for kind in plan.kinds if family not in interventions.get(kind).tasks]
  if bad:
    allowed = ("none",) + tuple(kw for kind in interventions.registered()
                                if family in kind.tasks
                                for kw in (kind.name,) + tuple(kind.aliases))
    what = "the token task" if family == "tokens" else f"{family} tasks"
    raise ValueError(
        f"condition {entry!r}: clamp kind(s) {bad} are specific to the few-shot task (they "
        f"read its label tokens / query row) and are not defined on {what}; allowed "
        f"there: {', '.join(allowed)}")


def check_seeds(cfg: ExperimentConfig) -> None:
  """Refuses an empty or duplicated list of init seeds, or an init seed equal to
  train_seed or eval_seed (the three must be pairwise distinct)."""
  t = cfg.train
  if not cfg.sweep.init_seeds:
    raise ValueError("sweep.init_seeds is empty")
  if t.train_seed == t.eval_seed:
    raise ValueError(f"train_seed and eval_seed must differ (both {t.train_seed})")
  for s in cfg.sweep.init_seeds:
    if s in (t.train_seed, t.eval_seed):
      raise ValueError(f"init seed {s} equals train_seed ({t.train_seed}) or eval_seed "
                       f"({t.eval_seed}); the three seeds must be pairwise distinct")
  if len(set(cfg.sweep.init_seeds)) != len(cfg.sweep.init_seeds):
    raise ValueError(f"duplicate init seeds in {cfg.sweep.init_seeds}")


def make_mesh(num_runs: int) -> jax.sharding.Mesh | None:
  """A 1-D ('runs',) mesh over min(local devices, runs) devices, or None for one.

  Using no more devices than runs means a program of R <= devices runs is never padded
  (e.g. 8 runs on a 16-core machine's 16 CPU devices use 8 of them).
  """
  devices = jax.local_devices()[:num_runs]
  if len(devices) <= 1:
    return None
  return jax.make_mesh((len(devices),), ("runs",),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def setup_experiment(cfg_or_program: ExperimentConfig | Program, *,
                     shard: bool = True) -> Experiment:
  """Validates a single-program config (or a planned Program) and builds its inputs."""
  if isinstance(cfg_or_program, ExperimentConfig):
    programs = sweep_lib.plan_programs(cfg_or_program)
    if len(programs) != 1:
      raise ValueError(f"this sweep needs {len(programs)} programs; plan them with "
                       "ih_jax.sweep.plan_programs and set up each one")
    program = programs[0]
  else:
    program = cfg_or_program
  cfg = program.cfg
  for v in program.variants:
    check_seeds(v.cfg)
  if cfg.train.batch_size < 1:
    raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
  task = tasks_lib.for_config(cfg)
  task.check()
  data = task.setup([v.cfg for v in program.variants])
  conds = program_conditions(program)
  runs = program_runs(program)
  specs: list[RunSpec] = list(program.runs)
  if sorted(s.variant for s in specs) != [s.variant for s in specs]:
    raise ValueError("runs must be ordered variant-major")
  mesh = make_mesh(len(specs)) if shard else None
  if mesh is not None:  # pad with copies of the last run
    specs += [specs[-1]] * (-len(specs) % mesh.size)
  stacked = clamps_lib.stack([conds[s.condition] for s in specs])
  if clamps_lib.plan_for(stacked).uses("graft"):
    template = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg,
                                                  data.data_V.shape[-1]))
    stacked = graft_lib.add_graft_params(cfg, stacked, template)
  exp = Experiment(cfg, program.variants, data.data_V, data.splits, data.train_spec,
                   data.eval_batches, runs,
                   np.asarray([s.variant for s in specs], np.int32),
                   np.asarray([s.init_seed for s in specs], np.uint32),
                   stacked, clamps_lib.plan_for(stacked), mesh, task)
  return exp


def eval_set_names(cfg: ExperimentConfig) -> list[str]:
  """The eval set names a config logs (its task's; the few-shot task: its evaluators')."""
  return tasks_lib.for_config(cfg).eval_set_names()


def program_conditions(program: Program) -> dict[str, clamps_lib.Clamps]:
  """Condition name -> its parsed clamps, for each distinct condition of the program."""
  cfg = program.cfg
  entries = tuple(dict.fromkeys(r.condition_entry for r in program.runs))
  return dict(parse_conditions(entries, cfg.model.num_layers, cfg.model.num_heads,
                               graft_lib.donor_names(cfg), num_seqs=cfg.train.num_seqs,
                               family=tasks_lib.get(cfg.task.kind).family))


def program_runs(program: Program) -> list[Run]:
  """The runs of a program, in runs-axis order (cheap: builds no arrays)."""
  conds = program_conditions(program)
  names = graft_lib.donor_names(program.cfg)
  return [Run(i, r.condition, clamps_lib.describe(conds[r.condition], names), r.init_seed,
              program.variants[r.variant].name) for i, r in enumerate(program.runs)]


# ------------------------------------------------------------------ placement

def runs_sharding(exp: Experiment) -> NamedSharding | None:
  """The sharding that splits the runs axis over the mesh (None without a mesh)."""
  return None if exp.mesh is None else NamedSharding(exp.mesh, P("runs"))


def replicated(exp: Experiment) -> NamedSharding | None:
  """The sharding that replicates an array on every device (None without a mesh)."""
  return None if exp.mesh is None else NamedSharding(exp.mesh, P())


def place_state(exp: Experiment, state: TrainState) -> TrainState:
  """Puts runs-stacked leaves on the runs mesh axis and the rest replicated."""
  if exp.mesh is None:
    return state
  rs, rep = runs_sharding(exp), replicated(exp)
  put = lambda tree, s: jax.tree.map(lambda x: jax.device_put(x, s), tree)
  return TrainState(put(state.params, rs), put(state.opt_state, rs),
                    jax.device_put(state.data_key, rep), jax.device_put(state.step, rep))


def place_inputs(exp: Experiment) -> tuple[Any, jax.Array, dict[str, sampler.Batch]]:
  """(clamps, features, eval batches) on device(s)."""
  clamps = jax.tree.map(jnp.asarray, exp.clamps)
  if exp.mesh is None:
    return clamps, exp.features, exp.eval_batches
  rs, rep = runs_sharding(exp), replicated(exp)
  return (jax.device_put(clamps, rs), jax.device_put(exp.features, rep),
          jax.device_put(exp.eval_batches, rep))


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
  """One config's optimizer (with the defaults, plain Adam: a zero gradient leaves a
  parameter unchanged, which the frozen parts of clamped runs rely on)."""
  return optim.transformation(optim.plan_for([cfg.train]))


def optimizer_plan(exp: Experiment) -> optim.OptimizerPlan:
  """The program's optimizer: static kind, numbers shared or per data variant."""
  return optim.plan_for([v.cfg.train for v in exp.variants])


def init_params(key: jax.Array, cfg: ExperimentConfig, feature_dim: int) -> Any:
  """One run's params for this config's task."""
  return model_lib.init_params(key, cfg.model, feature_dim, task=tasks_lib.for_config(cfg))


def init_state(exp: Experiment, warm_start: bool = True) -> TrainState:
  """The initial TrainState: every run's params from its init seed (or, with
  train.init_from and `warm_start`, from that workdir's params except train.reinit's
  groups) with fresh optimizer state, one training-stream key per data variant (from
  its train_seed), step 0, placed on the device(s)."""
  cfg = exp.cfg
  init = lambda key: init_params(key, cfg, exp.features.shape[-1])
  donor = None
  if warm_start and cfg.train.init_from:
    donor = warmstart.load(cfg.train.init_from, jax.eval_shape(lambda: init(jax.random.key(0))))

  @jax.jit  # one compiled program (eagerly, the optimizer's init is dozens of dispatches)
  def params_and_opt_state(seeds, donor):
    params = jax.vmap(lambda s: init(jax.random.key(s)))(seeds)
    if donor is not None:
      params = warmstart.combine(params, donor, cfg.train.reinit, cfg.model.num_heads)
    return params, jax.vmap(optim.transformation(optimizer_plan(exp)).init)(params)

  params, opt_state = params_and_opt_state(jnp.asarray(exp.run_init_seeds), donor)
  # Per variant: train_seed -> (data key, model key); the model key is unused (no dropout).
  data_keys = jnp.stack([jax.random.split(jax.random.key(v.cfg.train.train_seed))[0]
                         for v in exp.variants])
  return place_state(exp, TrainState(params, opt_state, data_keys, jnp.zeros((), jnp.int32)))


def _variant_slices(exp: Experiment) -> list[tuple[int, int, int]]:
  """(variant, start, stop) of the contiguous run blocks of each variant."""
  out = []
  for v in range(len(exp.variants)):
    idx = np.nonzero(exp.run_variant == v)[0]
    out.append((v, int(idx[0]), int(idx[-1]) + 1))
  return out


def make_forward(exp: Experiment, params: Any, clamps: Any, plan: clamps_lib.ClampPlan,
                 seqs: Any) -> tasks_lib.Forward:
  """One run's forward pass under its interventions, as the task's `loss` / `evaluate`
  call it: forward(batch, *, sites=(), query_only=False) -> (logits, aux)."""
  def forward(batch, *, sites=(), query_only=False):
    return model_lib.apply(params, batch, clamps, exp.cfg.model, plan, sites=sites,
                           query_only=query_only, seqs=seqs, task=exp.task)
  return forward


def make_evaluate(exp: Experiment) -> Callable:
  """(params_R, clamps_R, eval_batches_V, seqs) -> {set: {'clamped'|'unclamped': {metric:
  [R_pad]}}}; `seqs` (sequences seen) decides which windowed clamps act."""
  cfg = exp.cfg
  unclamped_too = cfg.train.eval_unclamped and exp.plan != clamps_lib.NO_CLAMPS
  blocks = _variant_slices(exp)

  task = exp.task
  many_runs = exp.num_padded > 1

  def one_run(params, clamps, batch, clamped: bool, seqs):
    forward = make_forward(exp, params, clamps if clamped else None,
                           exp.plan if clamped else clamps_lib.NO_CLAMPS,
                           seqs if clamped else None)
    return task.evaluate(forward, batch, many_runs)

  def block(params_R, clamps_R, batch, seqs):
    res = {"clamped": jax.vmap(lambda p, c: one_run(p, c, batch, True, seqs))(params_R, clamps_R)}
    if unclamped_too:
      res["unclamped"] = jax.vmap(lambda p: one_run(p, None, batch, False, None))(params_R)
    return res

  def evaluate(params_R, clamps_R, batches_V, seqs=None):
    out = {}
    for name, batch_V in batches_V.items():
      parts = []
      for v, lo, hi in blocks:  # each variant's runs share that variant's eval batch
        sl = lambda t, lo=lo, hi=hi: jax.tree.map(lambda x: x[lo:hi], t)
        parts.append(block(sl(params_R) if len(blocks) > 1 else params_R,
                           sl(clamps_R) if len(blocks) > 1 else clamps_R,
                           jax.tree.map(lambda x, v=v: x[v], batch_V), seqs))
      out[name] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return out

  return evaluate


class FlatParams:
  """One run's params as a single flat vector [P] (and back), for the training loop.

  The loop carries each run's params and its optimizer's params-shaped moments flat:
  Adam is elementwise, so it then runs as a few fused ops per step instead of a few
  per parameter leaf (19 leaves in the paper's model). The math is unchanged; XLA fuses
  it differently, so float rounding differs (1e-7 relative on gradients; Adam turns that
  into up to +-lr on parameters whose gradient is at noise level, e.g. key biases when
  the scores are shift-invariant). Checkpoints, results and TrainState keep the usual
  trees: the chunk flattens on entry and unflattens on exit.
  """
  PAD = 64

  def __init__(self, template: Any):
    self.template = template
    leaves, self.treedef = jax.tree.flatten(template)
    dtypes = {l.dtype for l in leaves}
    if len(dtypes) != 1:
      raise ValueError(f"flat params need one dtype, got {sorted(map(str, dtypes))}")
    self.shapes = [l.shape for l in leaves]
    sizes = [int(np.prod(s)) for s in self.shapes]
    self.offsets = np.cumsum(sizes).tolist()  # the last one is where the padding starts
    # Zero padding to a multiple of PAD: XLA:CPU's loop emitter vectorises Adam's fused
    # update (sqrt, divide) only for such lengths (67,141 -> 67,200 floats: ~75 -> ~24 us
    # per update on 2 cores, BUILD_NOTES.md). The padding gets zero gradients, so it stays 0.
    self.size = -(-sum(sizes) // self.PAD) * self.PAD

  def is_params(self, x: Any) -> bool:
    """Whether `x` has the params tree's structure (e.g. an Adam moment)."""
    return jax.tree.structure(x) == self.treedef

  def ravel(self, tree: Any) -> jax.Array:
    """A params tree -> one flat [P] vector (leaves in tree order, zero-padded to `size`)."""
    leaves = [x.reshape(-1) for x in jax.tree.leaves(tree)]
    pad = jnp.zeros((self.size - self.offsets[-1],), leaves[0].dtype)
    return jnp.concatenate(leaves + [pad])

  def unravel(self, flat_P: jax.Array) -> Any:
    """A flat [P] vector -> the params tree (the padding is dropped)."""
    # jnp.split's transpose is one concatenate: the gradient arrives flat, cheaply.
    parts = jnp.split(flat_P, self.offsets)[:-1]
    return jax.tree.unflatten(self.treedef, [p.reshape(s) for p, s in zip(parts, self.shapes)])

  def ravel_state(self, params_R: Any, opt_state_R: Any) -> tuple[jax.Array, Any]:
    """Runs-stacked params and optimizer state -> ([R, P], state with [R, P] moments)."""
    ravel_R = jax.vmap(self.ravel)
    opt = jax.tree.map(lambda x: ravel_R(x) if self.is_params(x) else x, opt_state_R,
                       is_leaf=self.is_params)
    return ravel_R(params_R), opt

  def unravel_state(self, params_RP: jax.Array, flat_opt_R: Any, like_opt_R: Any
                    ) -> tuple[Any, Any]:
    """The inverse of ravel_state; `like_opt_R` is a state of the tree form (its structure)."""
    unravel_R = jax.vmap(self.unravel)
    opt = jax.tree.map(lambda like, x: unravel_R(x) if self.is_params(like) else x,
                       like_opt_R, flat_opt_R, is_leaf=self.is_params)
    return unravel_R(params_RP), opt


def make_train_chunk(exp: Experiment, max_steps: int, flat_params_out: bool = False
                     ) -> Callable:
  """Jitted (state, n_steps, do_eval, clamps_R, features_V, eval_batches_V)
  -> (state, (losses, gnorms), evals), plus the final params as one flat [R_pad, P_pad]
  array (FlatParams order) with `flat_params_out` (for snapshots: not donated with
  the state, so the host can copy it while the next chunk runs).

  Runs n_steps (dynamic, <= max_steps) optimizer steps in a device loop, then
  evaluates if do_eval (a traced flag, so one compile serves both kinds of
  chunk; skipped evals return zeros). Per-step train loss and gradient norm land
  in [R_pad, max_steps] buffers.
  """
  cfg = exp.cfg
  B = cfg.train.batch_size
  task = exp.task
  opt_plan = optimizer_plan(exp)
  hp_R = opt_plan.per_run(exp.run_variant)  # {} unless a number differs between runs
  evaluate = make_evaluate(exp)
  R, V = exp.num_padded, len(exp.variants)
  run_variant = jnp.asarray(exp.run_variant)
  rs = runs_sharding(exp)
  constrain = (lambda t: t) if rs is None else \
      (lambda t: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, rs), t))

  flat = FlatParams(jax.eval_shape(
      lambda: init_params(jax.random.key(0), cfg, exp.features.shape[-1])))

  # Windowed clamps need the sequences seen; a program without windows does not read it.
  timed = bool(exp.plan.scheduled)

  def loss_fn(params, batch, clamps, seqs):
    return task.loss(make_forward(exp, params, clamps, exp.plan, seqs if timed else None),
                     batch)

  def sample(key, table, lookup):
    return task.sample(key, table, lookup, B)

  # Freeze schedules (ih_jax.freeze): [G, P] group masks and per-run windows, compiled
  # only when some run freezes something.
  fplan = freeze_lib.plan_for([v.cfg.train for v in exp.variants], cfg.model.num_layers,
                              cfg.model.num_heads)
  if fplan is not None:
    masks_GP = jnp.stack([flat.ravel(freeze_lib.group_mask(flat.template, g, cfg.model.num_heads))
                          for g in fplan.groups])
    windows_R = fplan.per_run(exp.run_variant)
  else:
    windows_R = (jnp.zeros((R, 0), jnp.int32),) * 2

  def run_step(flat_params, opt_state, batch, clamps, hp, window, step):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(flat.unravel(p), batch, clamps, step * B))(flat_params)
    tx = optim.transformation(opt_plan, hp, step)
    updates, opt_state = tx.update(grads, opt_state, flat_params)
    new_params = optax.apply_updates(flat_params, updates)
    if fplan is not None:
      # Frozen groups keep their values by selection: exact by construction.
      frozen_P = freeze_lib.frozen_at(masks_GP, *window, step * B)
      new_params = jnp.where(frozen_P, flat_params, new_params)
    return new_params, opt_state, loss, optax.tree.norm(grads)

  def chunk(state: TrainState, n_steps, do_eval, clamps_R, feats_V, batches_V):
    # The task's sampling inputs: per variant (few-shot: the training rows of each
    # variant's table) and shared (the lookup of those rows).
    table_V, lookup = task.sampling_inputs(feats_V)

    def body(i, carry):
      params, opt_state, data_key_V, losses, gnorms = carry
      keys = jax.vmap(jax.random.split)(data_key_V)
      data_key_V, batch_key_V = keys[:, 0], keys[:, 1]
      # Training sees few distinct exemplars (50 classes x 1 exemplar in the paper):
      # they are embedded once per step and gathered (IndexedFeatures).
      if V == 1:  # one batch shared by every run (it depends only on train_seed)
        batch = sample(batch_key_V[0], table_V[0], lookup)
        batch_axis = None
      else:       # each run trains on its variant's batch
        batch_V = jax.vmap(lambda k, t: sample(k, t, lookup))(batch_key_V, table_V)
        batch = jax.tree.map(lambda x: x[run_variant], batch_V)
        batch_axis = 0
      params, opt_state, loss_R, gnorm_R = jax.vmap(
          run_step, in_axes=(0, 0, batch_axis, 0, 0, 0, None))(
              params, opt_state, batch, clamps_R, hp_R, windows_R, state.step + i)
      params, opt_state = constrain(params), constrain(opt_state)
      losses = losses.at[:, i].set(loss_R)
      gnorms = gnorms.at[:, i].set(gnorm_R)
      return params, opt_state, data_key_V, losses, gnorms

    # The loop carries flat params and moments (FlatParams); the state keeps its trees.
    params_R, opt_state_R = flat.ravel_state(state.params, state.opt_state)
    buf = jnp.full((R, max_steps), jnp.nan, jnp.float32)
    if rs is not None:
      buf = jax.lax.with_sharding_constraint(buf, rs)
    flat_params, opt_state, data_key, losses, gnorms = jax.lax.fori_loop(
        0, n_steps, body, (params_R, opt_state_R, state.data_key, buf, buf))
    params, opt_state = flat.unravel_state(flat_params, opt_state, state.opt_state)
    new_state = TrainState(params, opt_state, data_key, state.step + n_steps)
    seqs_now = new_state.step * B if timed else None  # the evaluation's point
    zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(evaluate, params, clamps_R, batches_V, seqs_now))
    evals = jax.lax.cond(do_eval, lambda: evaluate(params, clamps_R, batches_V, seqs_now),
                         zeros)
    if flat_params_out:
      return new_state, (losses, gnorms), evals, flat_params
    return new_state, (losses, gnorms), evals

  return jax.jit(chunk, donate_argnums=(0,))
