"""The host driver of training: programs of stacked runs, checkpoints, interruption and resume.

`train_and_evaluate(cfg, workdir)` plans the sweep into programs
(ih_jax.sweep), and trains each program's runs side by side in one compiled
program (ih_jax.train.step). The host only dispatches one call per schedule
boundary (an evaluation or checkpoint point) and writes the previous chunk's
metrics while the next one runs.

Saved state: params-only snapshots on the configured dense schedule go to one
array store (ih_jax.snapshots, written by a background thread); the full training
state goes to a few Orbax resume checkpoints (every checkpoint.resume_every_s, on
SIGINT/SIGTERM, at the end).

Resume: rerunning with the same config and workdir continues from the newest
readable resume checkpoint whose snapshots are all intact; the data stream lives in
the checkpoint, so the resumed run is step-for-step the uninterrupted one. SIGINT /
SIGTERM stop at the next boundary after writing a resume checkpoint.

Several processes (ih_jax.distributed): every process runs this same loop on its share
of the runs; process 0 alone writes the workdir's files and prints progress, resume
checkpoints are saved by all together, and every decision that reads files or the
clock (resume or not, when to save, a signal on any process) is shared, so all
processes take the same branch at every boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ih_jax import checkpoint as ckpt_lib
from ih_jax import distributed
from ih_jax import schedule
from ih_jax import snapshots as snap_lib
from ih_jax import sweep as sweep_lib
from ih_jax import tracking
from ih_jax import workdir as workdir_lib
from ih_jax.config import ExperimentConfig
from ih_jax.train.experiment import (Experiment, Run, program_conditions, program_runs,
                                     setup_experiment)
from ih_jax.train.placement import place_inputs, place_state
from ih_jax.train.state import TrainState, init_state, optimizer_plan
from ih_jax.train.step import make_train_chunk

# pylint: disable=invalid-name


class TrainingInterrupted(KeyboardInterrupt):
  """Raised after a SIGINT/SIGTERM once a resume checkpoint is safely written."""


@dataclasses.dataclass
class TrainResult:
  """What training one program returns: its runs, final params, metrics, train log and timings.

  With several processes, process 0's result is the whole one; the others' hold the
  final params and what they trained in this call (nothing for a workdir that was
  already finished, only the chunks after the resume point for a resumed one).
  """
  runs: list[Run]
  params: Any                  # runs-stacked final params (host)
  metrics: list[dict[str, Any]]  # one row per run x eval point x eval set x clamped
  train_seqs: np.ndarray       # [S] sequences label of each step's loss
  train_loss: np.ndarray       # [R, S]
  grad_norm: np.ndarray        # [R, S]
  wall_s: float                # everything: setup, compile, training loop, outputs
  compile_s: float             # compiling the training program
  workdir: str | None = None
  setup_s: float = float("nan")  # before compiling: inputs, eval sets, init, workdir checks


def train_and_evaluate(cfg: ExperimentConfig, workdir: str | None = None, *,
                       overwrite: bool = False, verbose: bool = True
                       ) -> TrainResult | list[TrainResult]:
  """Trains every run of the sweep; writes outputs to `workdir` if given.

  Returns one TrainResult when the sweep is one program, else one per program
  (their workdirs are `workdir/program_<k>`, listed in `workdir/sweep.json`).
  """
  if workdir is not None:  # a file / read-only path fails now, not after the setup
    distributed.agree(lambda: workdir_lib.check_workdir(workdir))
  programs, cpu_split = _plan(cfg, None if overwrite else workdir,
                              verbose=verbose and distributed.is_primary())
  if len(programs) == 1:
    return train_program(programs[0], cfg, workdir, overwrite=overwrite, verbose=verbose)
  for p in programs:  # every condition checked now, not when its program's turn comes
    program_conditions(p)
  verbose = verbose and distributed.is_primary()
  if verbose:
    why = (f"; on CPU programs of at most {CPU_RUNS_PER_DEVICE} runs per core train "
           "fastest, sweep.max_runs_per_program overrides" if cpu_split else "")
    print(f"[ih_jax] sweep split into {len(programs)} programs "
          f"({', '.join(str(len(p.runs)) for p in programs)} runs{why})", flush=True)
  if workdir is not None:
    distributed.agree(lambda: _prepare_sweep_dir(workdir, cfg, programs, overwrite))
  results = []
  for p in programs:
    sub = None if workdir is None else os.path.join(workdir, p.name)
    if verbose:
      print(f"[ih_jax] --- {p.name}: {len(p.runs)} runs, variants "
            f"{[v.name or 'base' for v in p.variants]}", flush=True)
    results.append(train_program(p, cfg, sub, overwrite=False, verbose=verbose))
  return results


def _prepare_sweep_dir(workdir: str, cfg: ExperimentConfig, programs: list[sweep_lib.Program],
                       overwrite: bool) -> None:
  """Checks every program's folder before training any, then writes sweep.json."""
  if overwrite:
    workdir_lib.remove_outputs(workdir)
  single = [n for n in workdir_lib.output_entries(workdir) if n in workdir_lib.RUN_OUTPUTS]
  if single:  # a one-program run's outputs would sit stale beside the sweep's
    raise FileExistsError(
        f"workdir {workdir!r} holds {', '.join(single)} of a one-program run, but this sweep "
        f"needs {len(programs)} programs; use a new --workdir or pass overwrite=True "
        "(--overwrite)")
  for p in programs:
    sub = os.path.join(workdir, p.name)
    if os.path.isdir(sub):  # raises on a conflicting config or run list
      workdir_lib.workdir_status(sub, cfg, program_runs(p),
                                 overwrite=False)
  os.makedirs(workdir, exist_ok=True)
  _write_sweep_index(workdir, programs)


def _write_sweep_index(workdir: str, programs: list[sweep_lib.Program]) -> None:
  workdir_lib.write_sweep_index(workdir, [
      dict(workdir=p.name, variants=[v.name for v in p.variants],
           runs=[dataclasses.asdict(r) for r in p.runs]) for p in programs])


def _plan(cfg: ExperimentConfig, workdir: str | None, *, verbose: bool
          ) -> tuple[list[sweep_lib.Program], bool]:
  """The sweep's programs: sweep.max_runs_per_program, else automatic (auto_max_runs).

  An existing workdir keeps the layout it was started with (one program, or the
  programs its sweep.json lists) when that is a split of this sweep, so it resumes or
  reloads as it was trained on another machine, core count or version (`workdir`
  None: a new layout). Also returns whether the CPU limit split the sweep.
  """
  if cfg.sweep.max_runs_per_program:
    return sweep_lib.plan_programs(cfg, cfg.sweep.max_runs_per_program), False
  if workdir is not None:
    limit = distributed.agree(lambda: _existing_limit(workdir, cfg))
    if limit is not None:
      programs = sweep_lib.plan_programs(
          cfg, memory_max_runs if limit == "memory" else (limit or None))
      if verbose and ([p.runs for p in programs] !=
                      [p.runs for p in sweep_lib.plan_programs(cfg, auto_max_runs)]):
        print(f"[ih_jax] {workdir} was started as {len(programs)} program(s) of "
              f"{', '.join(str(len(p.runs)) for p in programs)} runs; continuing it so",
              flush=True)
      return programs, False
  programs = sweep_lib.plan_programs(cfg, auto_max_runs)
  group_sizes = [len(p.runs) for p in sweep_lib.plan_programs(cfg, None)]
  return programs, any(cpu_max_runs(n) is not None for n in group_sizes)


def _existing_limit(workdir: str, cfg: ExperimentConfig) -> int | str | None:
  """The runs-per-program limit that reproduces `workdir`'s layout: 0 (no limit) for a
  one-program run, "memory" (memory_max_runs) or a number for a sweep.json whose run
  lists it gives; None when the workdir holds neither (a new layout is planned)."""
  if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_JSON)):
    return 0 if len(sweep_lib.plan_programs(cfg, None)) == 1 else None
  if not workdir_lib.is_sweep(workdir):
    return None
  try:
    index = [p.get("runs") for p in workdir_lib.read_sweep_index(workdir)]
  except ValueError:
    return None
  sizes = sorted({len(runs or ()) for runs in index}, reverse=True)
  for limit in [*sizes, 0, "memory"]:
    programs = sweep_lib.plan_programs(
        cfg, memory_max_runs if limit == "memory" else (limit or None))
    if index == [workdir_lib.runs_as_json(p.runs) for p in programs]:
      return limit
  return None


# On CPU a program's per-run step and evaluation times stay flat up to ~12 runs per
# device and rise beyond (the working set leaves the cache): per run-step 0.49 / 0.57 /
# 0.51 / 0.57 / 0.67 ms at 8 / 12 / 16 / 24 / 32 runs on 2 cores (`ih-jax bench --quick
# --skip-clamps --ckpt-runs= --runs=8,12,16,24,32 --steps=300 --repeats=3`).
CPU_RUNS_PER_DEVICE = 12


def cpu_max_runs(num_runs: int) -> int | None:
  """On CPU (one process), a limit splitting more than CPU_RUNS_PER_DEVICE runs per
  CPU device into the fewest programs under it, of near-equal size and each a multiple
  of the device count (32 runs on 2 cores: 2 x 16); None elsewhere or when they fit."""
  if jax.default_backend() != "cpu" or distributed.multiprocess():
    return None
  return split_limit(num_runs, jax.local_device_count(), CPU_RUNS_PER_DEVICE)


def split_limit(num_runs: int, devices: int, per_device: int) -> int | None:
  """The chunk size that splits `num_runs` into the fewest programs of at most
  `per_device` runs per device, rounded up to a multiple of `devices` (None: one fits)."""
  cap = per_device * devices
  if num_runs <= cap:
    return None
  size = -(-num_runs // -(-num_runs // cap))  # ceil(runs / number of programs)
  return min(cap, -(-size // devices) * devices)


def auto_max_runs(group_cfg: ExperimentConfig, num_runs: int) -> int | None:
  """The automatic runs-per-program limit: the tighter of the CPU limit (cpu_max_runs)
  and the device-memory one (memory_max_runs); None for no limit."""
  limits = [x for x in (cpu_max_runs(num_runs), memory_max_runs(group_cfg, num_runs))
            if x is not None]
  return min(limits) if limits else None


def memory_max_runs(group_cfg: ExperimentConfig, num_runs: int) -> int | None:
  """Runs per program that fit in device memory for this group, or None (no limit).

  Per-run memory grows linearly: params + Adam state + per-run activations of
  training and evaluation. Estimated from the compiled memory footprint of a
  one-run program of this group, only for groups of more than 64 runs per device.
  """
  if num_runs <= 64 * jax.device_count():
    return None
  name, entry, seed = sweep_lib.condition_runs(group_cfg.sweep.conditions,
                                               group_cfg.sweep.init_seeds)[0]
  _, bound, spec = sweep_lib.split_condition(entry)
  one = dataclasses.replace(group_cfg, sweep=dataclasses.replace(
      group_cfg.sweep, conditions=(entry if bound is None else f"{name}={spec}",),
      init_seeds=(seed,), grid=()))
  exp = setup_experiment(sweep_lib.plan_programs(one)[0], shard=False)
  state = init_state(exp, warm_start=False)  # only shapes matter here
  clamps, feats, batches = place_inputs(exp)
  mem = make_train_chunk(exp, 1).lower(state, 0, True, clamps, feats, batches).compile() \
      .memory_analysis()
  per_run = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return max(1, int(0.5 * limit / max(per_run, 1))) * jax.device_count()


@contextlib.contextmanager
def _stop_on_signals(enabled: bool):
  """Turns SIGINT/SIGTERM into a flag the loop checks at each boundary.

  Only when there is a workdir to checkpoint into; otherwise signals act as usual.
  """
  flag = {"signal": None}
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield flag
    return
  old = {}

  def handler(signum, _frame):
    flag["signal"] = signal.Signals(signum).name
    # A second signal kills immediately.
    signal.signal(signum, old[signum])

  for s in (signal.SIGINT, signal.SIGTERM):
    old[s] = signal.signal(s, handler)
  try:
    yield flag
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def train_program(program: sweep_lib.Program, sweep_cfg: ExperimentConfig,
                  workdir: str | None, *, overwrite: bool = False,
                  verbose: bool = True) -> TrainResult:
  """Trains one program's runs, resuming from `workdir` when it holds the same config."""
  t_start = time.time()
  if workdir is not None:
    distributed.agree(lambda: workdir_lib.check_workdir(workdir))
  exp = setup_experiment(program)
  cfg = exp.cfg
  B = cfg.train.batch_size
  primary = distributed.is_primary()
  verbose = verbose and primary
  log = (lambda msg: print(msg, flush=True)) if verbose else (lambda msg: None)
  eval_steps = schedule.eval_steps(cfg.train.eval_every, cfg.train.num_seqs, B)
  ckpt_steps = (schedule.checkpoint_steps(cfg.checkpoint, cfg.train.num_seqs, B)
                if workdir is not None else [])
  boundaries = sorted(set(eval_steps) | set(ckpt_steps))
  eval_set, ckpt_set = set(eval_steps), set(ckpt_steps)
  total_steps = boundaries[-1]
  total_seqs = total_steps * B

  status = "fresh"
  if workdir is not None:
    status = distributed.agree(lambda: workdir_lib.workdir_status(
        workdir, sweep_cfg, exp.runs, overwrite=overwrite,
        features=workdir_lib.feature_records(exp), log=log))
    if status == "done":
      log(f"[ih_jax] {workdir} already holds this finished run; loading its results")
      if primary:
        return load_result(workdir, exp.runs)
      return TrainResult(exp.runs, None, [], np.zeros(0, np.int64), np.zeros((len(exp.runs), 0)),
                         np.zeros((len(exp.runs), 0)), float("nan"), float("nan"))

  with jax.default_matmul_precision(cfg.train.matmul_precision):
    # A resumed run's state comes from its checkpoint: no warm-start donor is read.
    state = init_state(exp, warm_start=status != "resume")
    clamps_dev, feats_dev, batches_dev = place_inputs(exp)
    ckptr, snaps, start_step, resumed = None, None, 0, False
    if workdir is not None:
      if status == "resume":
        distributed.agree(lambda: _refuse_old_layout(workdir))
      if status == "fresh":
        distributed.agree(lambda: workdir_lib.write_config(workdir, exp, sweep_cfg))
      runs_json = [dataclasses.asdict(r) for r in exp.runs]
      ckptr = ckpt_lib.RunCheckpointer(workdir, dict(config=sweep_cfg.to_dict(), runs=runs_json))
      layout = snap_lib.Layout.of(jax.tree.map(lambda x: x[0], state.params))
      snaps = _primary_only(lambda: snap_lib.SnapshotWriter(workdir, layout, runs_json, log=log))
      seqs0 = None
      if status == "resume":
        # The newest resume checkpoint before the first missing or damaged snapshot
        # (a damaged batch sends the run back to before it).
        limit = distributed.agree(lambda: snaps.resume_limit([s * B for s in ckpt_steps]))
        restored = None
        if limit is None or limit >= 0:
          restored = ckptr.restore_latest(ckpt_lib.to_host(state),
                                          lambda content: _state_from_saveable(exp, content),
                                          log=log, max_seqs=limit)
        if restored is not None:
          seqs0, state = restored
          start_step, resumed = seqs0 // B, True
          ckptr.drop_after(seqs0)
          log(f"[ih_jax] resuming {workdir} from the checkpoint at {seqs0:,d} seqs")
        else:
          log(f"[ih_jax] {workdir}: no usable resume checkpoint; starting from scratch")
          state = init_state(exp)
      writer, trackers = _primary_only(lambda: (
          snaps.open(seqs0),
          workdir_lib.RunWriter(workdir, exp, resume_seqs=start_step * B if resumed else None,
                                log=log),
          tracking.Trackers(cfg, workdir, exp.runs, log=log))[1:]) or (None, None)
    else:
      writer, trackers = None, None

    # A resumed run already did its checkpoint's boundary; a fresh one starts with
    # step 0's evaluation / checkpoint (a chunk of zero steps).
    todo = [b for b in boundaries if b > start_step or (b == 0 and not resumed)]
    max_chunk = max(1, int(max(np.diff([0] + boundaries))))
    # The same program on every process: snapshot params come out wherever there is a
    # workdir, though only process 0 writes them.
    chunk_fn = make_train_chunk(exp, max_chunk, flat_params_out=workdir is not None)
    t0 = time.time()
    setup_s = t0 - t_start
    log(f"[ih_jax] setup {setup_s:.1f}s (features, eval sets, init, workdir); compiling the "
        "training program ...")
    compiled = chunk_fn.lower(state, 0, True, clamps_dev, feats_dev, batches_dev).compile()
    compile_s = time.time() - t0
    log(f"[ih_jax] {len(exp.runs)} run(s)"
        f"{f' (padded to {exp.num_padded} over {exp.mesh.size} devices)' if exp.mesh else ''}"
        f" x {total_seqs:,d} seqs, {len(eval_steps)} evaluations, {len(ckpt_steps)} "
        f"snapshots; clamp plan: {exp.plan.num_passes} pass(es); optimizer: "
        f"{optimizer_plan(exp).describe()}; compile {compile_s:.1f}s")

    metrics_rows: list[dict[str, Any]] = []
    log_seqs, log_loss, log_gnorm = [], [], []
    R = len(exp.runs)
    names = exp.task.eval_set_names()
    metrics_of_task = exp.task.metric_names
    t_train, last_print, last_resume_save = time.time(), 0.0, time.time()
    done, pending = start_step, None
    last_finite = np.full(R, np.nan)  # each run's latest loss, for a divergence message

    def consume(item):
      nonlocal last_print
      step_from, n_steps, did_eval, (losses, gnorms), evals = item
      losses = np.asarray(losses)[:R, :n_steps]
      gnorms = np.asarray(gnorms)[:R, :n_steps]
      check_finite_losses(losses, exp.runs, step_from, B, last_finite, cfg.train.learning_rate)
      if n_steps:
        last_finite[:] = losses[:, -1]
      seqs_k = B * (step_from + 1 + np.arange(n_steps))  # loss of step k labelled B(k+1)
      log_seqs.append(seqs_k)
      log_loss.append(losses)
      log_gnorm.append(gnorms)
      seqs = B * (step_from + n_steps)
      rows = (_eval_rows(exp.runs, seqs, step_from + n_steps, jax.device_get(evals), names,
                         metrics_of_task)
              if did_eval else [])
      metrics_rows.extend(rows)
      if writer is not None:
        writer.append(rows, seqs_k, losses, gnorms)
        trackers.log(rows, seqs_k, losses, gnorms)
      now = time.time()
      if rows and verbose and (now - last_print >= cfg.train.progress_every_s
                               or seqs == total_seqs):
        rate = (seqs - start_step * B) / max(now - t_train, 1e-9)
        print(_progress_line(seqs, total_seqs, rate, rows, exp.runs, now - t_start), flush=True)
        last_print = now

    def save_resume(seqs: int, content: dict[str, Any]) -> None:
      if snaps is not None:  # every snapshot up to `seqs` on disk before the checkpoint
        snaps.sync()
      ckptr.save(seqs, content)

    with _stop_on_signals(ckptr is not None) as stop, _closing_on_error(snaps, trackers):
      # A snapshot is a flat params array the chunk returns beside the (donated) state:
      # the writer thread copies it to host and writes it while the device trains on.
      # A resume checkpoint's state is copied to host at its boundary, but written only
      # after the next chunk is dispatched and the boundary's rows and snapshots are on
      # disk: a resume from any checkpoint on disk never loses rows or snapshots (later
      # ones are cut).
      deferred = None
      for target in todo:
        n_steps = target - done
        did_eval = target in eval_set
        out = compiled(state, n_steps, did_eval, clamps_dev, feats_dev, batches_dev)
        state, logs, evals = out[:3]
        if snaps is not None and target in ckpt_set:
          out[3].copy_to_host_async()
          snaps.add(target * B, out[3])
        if pending is not None:  # host work for the previous chunk overlaps this one
          consume(pending)
          pending = None
        if deferred is not None:
          save_resume(*deferred)
          deferred = None
        pending = (done, n_steps, did_eval, logs, evals)
        done = target
        if ckptr is None:
          continue
        signalled = stop["signal"]  # read once: a signal may land at any moment
        resume_due = (target == total_steps or (
            cfg.checkpoint.resume_every_s > 0 and
            time.time() - last_resume_save >= cfg.checkpoint.resume_every_s))
        if distributed.multiprocess():  # process 0's clock; a signal on any process
          flags = distributed.gather_flags(
              [resume_due, signal.Signals[signalled].value if signalled else 0])
          resume_due, code = bool(flags[0, 0]), int(flags[:, 1].max())
          signalled = signal.Signals(code).name if code else None
        if resume_due or signalled:
          deferred = (target * B, ckpt_lib.to_host(state))
          last_resume_save = time.time()
        if signalled and target != total_steps:
          consume(pending)
          save_resume(*deferred)
          ckptr.wait()
          ckptr.close()
          if snaps is not None:
            snaps.close()
          if writer is not None:
            writer.close()
            trackers.close()
          raise TrainingInterrupted(
              f"{signalled} received: stopped at {target * B:,d} seqs after writing a "
              f"checkpoint; rerun the same command (same --workdir) to resume")
      if pending is not None:
        consume(pending)
      if deferred is not None:
        save_resume(*deferred)
    params = jax.tree.map(lambda x: x[:R], distributed.fetch(state.params))
    if ckptr is not None:
      if snaps is not None:
        snaps.close()
      ckptr.finish()

  wall = time.time() - t_start
  if writer is not None:
    writer.finish(dict(wall_s=wall, compile_s=compile_s,
                       resumed_from_seqs=start_step * B if resumed else None,
                       final_seqs=total_seqs))
    if trackers:
      trackers.finish(workdir_lib.read_metrics(workdir))
  if resumed and primary:  # earlier rows come from the interrupted process
    result = load_result(workdir, exp.runs, params=params)
    result.wall_s, result.compile_s = wall, compile_s
  else:
    result = TrainResult(exp.runs, params, metrics_rows, np.concatenate(log_seqs),
                         np.concatenate(log_loss, axis=1), np.concatenate(log_gnorm, axis=1),
                         wall, compile_s, workdir)
  result.setup_s = setup_s
  log(f"[ih_jax] done in {wall:.1f}s (setup {setup_s:.1f}s, compile {compile_s:.1f}s)")
  return result


def _primary_only(fn: Callable[[], Any]) -> Any:
  """fn() on process 0 (its error is raised on every process); None on the others."""
  out = []
  distributed.agree(lambda: out.append(fn()))
  return out[0] if out else None


@contextlib.contextmanager
def _closing_on_error(snaps: snap_lib.SnapshotWriter | None,
                      trackers: tracking.Trackers | None = None):
  """Stops the snapshot thread if training fails (what it buffered is dropped, as in a
  crash; the next run recomputes it from the resume checkpoint); flushes the trackers."""
  try:
    yield
  except BaseException:
    if snaps is not None:
      snaps.abort()
    if trackers is not None:
      trackers.close()
    raise


def _refuse_old_layout(workdir: str) -> None:
  """An unfinished workdir of the older checkpoint layout (Orbax checkpoints/<seqs>)
  cannot be continued into a snapshot store; its finished results still load."""
  old = os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)
  if (os.path.isdir(old) and any(d.isdigit() for d in os.listdir(old))
      and not snap_lib.has_store(workdir)):
    raise FileExistsError(
        f"workdir {workdir!r} holds an unfinished run saved in the older checkpoint layout "
        f"({ckpt_lib.CHECKPOINT_DIR}/<seqs>); finish it with the ih_jax version that started "
        "it, or pass overwrite=True (--overwrite) to train it again")


def check_finite_losses(losses_RS: np.ndarray, runs: list[Run], step_from: int,
                        batch_size: int, last_loss_R: np.ndarray, learning_rate: float) -> None:
  """Raises FloatingPointError naming the first diverged run of a chunk's losses.

  Checked per chunk (the host has the chunk's losses anyway), so no per-step sync.
  `last_loss_R`: each run's loss at the end of the previous chunk (nan if none).
  """
  bad = ~np.isfinite(losses_RS)
  if not bad.any():
    return
  r = int(np.argmax(bad.any(axis=1)))
  k = int(np.argmax(bad[r]))
  run = runs[r]
  prev = losses_RS[r, k - 1] if k else last_loss_R[r]
  last = f"{prev:.4g}" if np.isfinite(prev) else "none logged before"
  others = int(bad.any(axis=1).sum()) - 1
  # With a learning-rate grid the run's own value is in its variant name.
  now = "" if "learning_rate=" in (run.variant or "") else f" (now {learning_rate:g})"
  raise FloatingPointError(
      f"training loss is {losses_RS[r, k]} in run {run.index} (condition {run.condition!r}, "
      f"seed {run.init_seed}{f', {run.variant}' if run.variant else ''}) at step "
      f"{step_from + k + 1} ({batch_size * (step_from + k + 1):,d} seqs); last finite loss "
      f"{last}{f'; {others} other run(s) too' if others else ''}. Lower train.learning_rate"
      f"{now} or check the clamps")


def _state_from_saveable(exp: Experiment, content: dict[str, Any]) -> TrainState:
  """Host checkpoint content -> a placed TrainState, re-padded for this device count."""
  R, R_pad = len(exp.runs), exp.num_padded
  def repad(x):  # the saving process may have padded the runs axis differently
    x = np.asarray(x)[:R]
    return np.concatenate([x] + [x[-1:]] * (R_pad - R)) if R_pad > R else x
  train = content["train"]
  state = TrainState(jax.tree.map(repad, content["params"]),
                     jax.tree.map(repad, train["opt_state"]),
                     jax.random.wrap_key_data(jnp.asarray(train["data_key"])),
                     jnp.asarray(train["step"], jnp.int32))
  return place_state(exp, state)


def load_result(workdir: str, runs: list[Run], params: Any = None) -> TrainResult:
  """A TrainResult read back from a workdir (metrics, train log, final params)."""
  if params is None:
    _, params = ckpt_lib.load_stacked_params(workdir)
  seqs, loss, gnorm = workdir_lib.read_train_log(workdir, len(runs))
  return TrainResult(runs, params, workdir_lib.read_metrics(workdir), seqs, loss, gnorm,
                     float("nan"), float("nan"), workdir)


def _progress_line(seqs: int, total: int, rate: float, rows: list[dict], runs: list[Run],
                   elapsed: float) -> str:
  set_name = rows[0]["eval_set"]  # the first evaluator (fsl_train in the paper configs)
  losses = {r["run"]: r["loss"] for r in rows
            if r["eval_set"] == set_name and r["clamped"] == 1}
  shown = ", ".join(f"{runs[i].condition}/s{runs[i].init_seed}={l:.3f}"
                    for i, l in list(losses.items())[:4])
  more = f" (+{len(losses) - 4} runs)" if len(losses) > 4 else ""
  speed = f"{rate:,.0f} seq/s per run, ETA {(total - seqs) / rate:.0f}s" if rate > 0 else "starting"
  return (f"[ih_jax] {seqs:>10,d}/{total:,d} seqs ({100 * seqs / total:5.1f}%) | "
          f"{set_name} loss {shown}{more} | {speed} | {elapsed:.1f}s elapsed")


def _eval_rows(runs: list[Run], seqs: int, step: int, evals: dict,
               order: list[str], metric_cols: tuple[str, ...]) -> list[dict[str, Any]]:
  rows = []
  for set_name in order:
    for mode in ("clamped", "unclamped"):
      if mode not in evals[set_name]:
        continue
      metrics = evals[set_name][mode]
      for r in runs:
        row = dict(run=r.index, condition=r.condition, seed=r.init_seed, variant=r.variant,
                   seqs=seqs, step=step, eval_set=set_name, clamped=int(mode == "clamped"))
        row.update({m: float(metrics[m][r.index]) for m in metric_cols})
        rows.append(row)
  return rows
