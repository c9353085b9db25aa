"""Params-only snapshots for analysis, appended to one array store per program.

Layout inside a workdir:

  snapshots/manifest.json   layout of the flat params vector, runs, and the batches:
                            [{file, seqs: [...], crc32, bytes, fp: [[per run]...]}]
  snapshots/b<id>.npy       one batch: float32 [k, runs, P], the k snapshots' flat params

A snapshot is each run's params as one flat vector (the training loop's
`ih_jax.train.flat.FlatParams` order, without its padding), taken on the configured dense
schedule (`checkpoint.every / at / log_num / windows` plus the final point). The
device only copies the flat params to host; a background thread (bounded queue)
gathers snapshots into batches of ~32 MB and writes each batch as one .npy file
(temporary name, fsync, rename) and then the manifest (same), so a kill mid-write
leaves a stray temporary file or a batch the manifest does not list: both are
ignored and removed when the store is reopened. Each batch records the CRC-32 of its
file (checked when a run resumes) and each snapshot a per-run fingerprint (wrapping
uint32 sum of its bits, checked on every read of it).

Reads are memory-mapped slices: one snapshot of all runs is one contiguous block, one
run's series one block of P floats per snapshot.

Why .npy batches + a JSON manifest, not TensorStore/Zarr: no new code path to learn
(numpy only), float32 bit-exact, atomic by rename, and the torn-write and corruption
checks are ours to define (Zarr chunks written in place have no such guarantee).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zlib
from typing import Any, Callable

import numpy as np

SNAPSHOT_DIR = "snapshots"
MANIFEST = "manifest.json"
FORMAT = 1
BATCH_BYTES = 32 * 2**20   # a batch is written once it holds this much (or at a flush)
MAX_BATCH = 256            # ... or this many snapshots
QUEUE_SIZE = 64            # snapshots waiting for the writer before `add` blocks


class SnapshotError(RuntimeError):
  """A snapshot store is missing, damaged or does not hold what was asked."""


# ------------------------------------------------------------------ flat layout

def _key_name(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


class Layout:
  """Where each params leaf lies in the flat vector (nested dicts of float32 arrays)."""

  def __init__(self, paths: list[list[str]], shapes: list[tuple[int, ...]]):
    self.paths = [list(p) for p in paths]
    self.shapes = [tuple(int(d) for d in s) for s in shapes]
    sizes = [int(np.prod(s)) for s in self.shapes]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    self.size = self.offsets[-1]

  @classmethod
  def of(cls, params: Any) -> "Layout":
    """From one run's params tree (leaf order = jax.tree.flatten's, as FlatParams)."""
    import jax  # pylint: disable=g-import-not-at-top
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return cls([[_key_name(k) for k in path] for path, _ in flat],
               [np.shape(x) for _, x in flat])

  def to_json(self) -> dict[str, Any]:
    """The leaf paths and shapes, as stored in the manifest."""
    return dict(paths=self.paths, shapes=[list(s) for s in self.shapes])

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Layout":
    """The Layout stored by `to_json`."""
    return cls(d["paths"], [tuple(s) for s in d["shapes"]])

  def ravel(self, params: Any, lead: int = 0) -> np.ndarray:
    """Params tree (leaves with `lead` leading axes) -> [..., P] float32."""
    import jax  # pylint: disable=g-import-not-at-top
    leaves = jax.tree.leaves(params)
    head = np.shape(leaves[0])[:lead]
    return np.concatenate([np.asarray(x, np.float32).reshape(head + (-1,)) for x in leaves],
                          axis=-1)

  def unravel(self, flat: np.ndarray) -> dict[str, Any]:
    """[..., P] -> nested dict params with the leading axes kept (copies, not views)."""
    head = flat.shape[:-1]
    out: dict[str, Any] = {}
    for path, shape, lo, hi in zip(self.paths, self.shapes, self.offsets, self.offsets[1:]):
      node = out
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = np.array(flat[..., lo:hi]).reshape(head + shape)
    return out


def fingerprints(block: np.ndarray) -> np.ndarray:
  """[..., P] float32 -> [...] uint32: the wrapping sum of each vector's 32-bit words."""
  words = np.ascontiguousarray(block, np.float32).view(np.uint32)
  return (words.sum(axis=-1, dtype=np.uint64) & 0xFFFFFFFF).astype(np.uint32)


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(8 * 2**20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path))


# ------------------------------------------------------------------ reading

def store_dir(workdir: str) -> str:
  """The snapshot folder of a workdir."""
  return os.path.join(workdir, SNAPSHOT_DIR)


def has_store(workdir: str) -> bool:
  """Whether `workdir` holds a snapshot store (its manifest exists)."""
  return os.path.exists(os.path.join(store_dir(workdir), MANIFEST))


def read_manifest(workdir: str) -> dict[str, Any]:
  """The store's parsed manifest; SnapshotError if it is unreadable or of an unknown format."""
  path = os.path.join(store_dir(workdir), MANIFEST)
  try:
    with open(path) as f:
      m = json.load(f)
  except OSError as e:
    raise SnapshotError(f"cannot read {path}: {e.strerror}") from None
  except ValueError as e:
    raise SnapshotError(f"{path} is not valid JSON ({e})") from None
  if m.get("format") != FORMAT:
    raise SnapshotError(f"{path}: unknown snapshot format {m.get('format')!r} (this ih_jax "
                        f"reads format {FORMAT})")
  return m


class Store:
  """Read access to a workdir's snapshots (the manifest is read once)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.manifest = m = read_manifest(workdir)
    self.layout = Layout.from_json(m["layout"])
    self.num_runs = int(m["num_runs"])
    self.runs = list(m.get("runs", []))
    # seqs -> (batch index, row in batch)
    self.where: dict[int, tuple[int, int]] = {}
    for b, batch in enumerate(m["batches"]):
      for i, s in enumerate(batch["seqs"]):
        self.where[int(s)] = (b, i)
    self._arrays: dict[int, np.ndarray] = {}

  def steps(self) -> list[int]:
    """Sequences-seen labels of every stored snapshot, ascending."""
    return sorted(self.where)

  def _array(self, b: int) -> np.ndarray:
    if b not in self._arrays:
      batch = self.manifest["batches"][b]
      path = os.path.join(store_dir(self.workdir), batch["file"])
      try:
        arr = np.load(path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise SnapshotError(f"snapshot batch {path} is unreadable ({e}); it holds seqs "
                            f"{batch['seqs'][0]:,d}..{batch['seqs'][-1]:,d}") from None
      want = (len(batch["seqs"]), self.num_runs, self.layout.size)
      if arr.shape != want or arr.dtype != np.float32:
        raise SnapshotError(f"snapshot batch {path} holds {arr.dtype}{list(arr.shape)}, "
                            f"expected float32{list(want)} (truncated or replaced?)")
      self._arrays[b] = arr
    return self._arrays[b]

  def read(self, steps: list[int], runs: list[int] | slice | None = None) -> np.ndarray:
    """[K, runs, P] float32 of the snapshots at `steps` (exact), checked against their
    fingerprints; `runs` an int gives [K, P]. Memory-mapped slices, no whole-file read."""
    sel = slice(None) if runs is None else runs
    missing = [s for s in steps if s not in self.where]
    if missing:
      raise SnapshotError(f"no snapshot at {missing[0]:,d} seqs")
    width = len(np.arange(self.num_runs)[sel]) if isinstance(sel, (list, slice)) else None
    out = np.empty((len(steps),) + ((width,) if width is not None else ()) +
                   (self.layout.size,), np.float32)
    by_batch: dict[int, list[tuple[int, int]]] = {}
    for k, s in enumerate(steps):
      b, i = self.where[s]
      by_batch.setdefault(b, []).append((k, i))
    for b, items in by_batch.items():
      ks, rows = [k for k, _ in items], [i for _, i in items]
      arr = self._array(b)
      # One contiguous slice per snapshot (all runs, or one run's P floats).
      block = np.stack([arr[i, sel] for i in rows])
      want = np.asarray(self.manifest["batches"][b]["fp"], np.uint32)[rows][:, sel]
      if not np.array_equal(fingerprints(block), want):
        path = os.path.join(store_dir(self.workdir), self.manifest["batches"][b]["file"])
        raise SnapshotError(f"snapshot batch {path}: contents do not match the fingerprints "
                            "saved with them (corrupt file?)")
      out[ks] = block
    return out


# ------------------------------------------------------------------ writing

class SnapshotWriter:
  """Appends one program's snapshots to `workdir/snapshots/` from a background thread.

  `add(seqs, flat_RP)` takes a device (or host) array [R_pad, >= P] of the flat params
  and returns at once (it blocks only when QUEUE_SIZE snapshots wait); the thread copies
  it to host, batches and writes. `sync()` writes what is buffered and waits until it is
  on disk: call it before a resume checkpoint, so every snapshot at or before a resume
  point is durable.
  """

  def __init__(self, workdir: str, layout: Layout, runs: list[dict[str, Any]],
               log: Callable[[str], None] = print, batch_bytes: int | None = None):
    self.dir = store_dir(os.path.abspath(workdir))
    self.layout = layout
    self.runs = runs
    self.num_runs = len(runs)
    self.log = log
    per = self.num_runs * layout.size * 4
    self.batch_len = max(1, min(MAX_BATCH, (batch_bytes or BATCH_BYTES) // max(per, 1)))
    self.manifest: dict[str, Any] = dict(format=FORMAT, layout=layout.to_json(),
                                         num_runs=self.num_runs, runs=runs, batches=[],
                                         next_id=0)
    self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
    self._buf: list[tuple[int, np.ndarray]] = []
    self._error: BaseException | None = None
    self._thread: threading.Thread | None = None
    self._aborted = False
    self._checked: dict[str, str] = {}  # batch file -> problem ("" = intact), one check each

  # -- opening
  def _old_batches(self) -> tuple[list[dict[str, Any]], str | None]:
    """The stored batches up to the first damaged one, and what is wrong with it."""
    if not os.path.exists(os.path.join(self.dir, MANIFEST)):
      return [], None
    old = read_manifest(os.path.dirname(self.dir))
    if old.get("num_runs") != self.num_runs or old.get("layout") != self.manifest["layout"]:
      raise SnapshotError(f"{self.dir}: the snapshot store holds another layout or run count "
                          "than this program; pass overwrite=True (--overwrite) to start over")
    self.manifest["next_id"] = max(self.manifest["next_id"],
                                   int(old.get("next_id", len(old["batches"]))))
    kept = []
    for batch in old["batches"]:
      problem = self._checked.get(batch["file"]) or self._check_batch(batch)
      self._checked[batch["file"]] = problem or ""
      if problem:
        return kept, (f"{batch['file']} ({problem}; seqs {batch['seqs'][0]:,d}.."
                      f"{batch['seqs'][-1]:,d})")
      kept.append(batch)
    return kept, None

  def resume_limit(self, expected: list[int]) -> int | None:
    """The latest seqs a run may resume from without losing a snapshot: the first
    expected snapshot point (seqs) not stored intact (CRC-32, size), minus one; None
    when all are there (no limit). Reads, changes nothing."""
    kept, bad = self._old_batches()
    if bad:
      self.log(f"[ih_jax] WARNING: snapshot batch {bad} is damaged; it and later batches are "
               "dropped and recomputed")
    have = {int(s) for b in kept for s in b["seqs"]}
    missing = [p for p in expected if p not in have]
    return min(missing) - 1 if missing else None

  def open(self, resume_seqs: int | None) -> None:
    """Starts fresh (resume_seqs None) or keeps the intact snapshots at or before
    `resume_seqs`; later snapshots, damaged batches (and all after them) and files the
    manifest does not list (a torn write) are removed."""
    os.makedirs(self.dir, exist_ok=True)
    if resume_seqs is None:
      self._replace_all()
      return
    kept, _ = self._old_batches()
    final: list[dict[str, Any]] = []
    for batch in kept:  # a batch straddling the resume point is rewritten with its prefix
      seqs = [int(s) for s in batch["seqs"]]
      if seqs[-1] <= resume_seqs:
        final.append(batch)
        continue
      n = sum(s <= resume_seqs for s in seqs)
      if n:
        arr = np.load(os.path.join(self.dir, batch["file"]), mmap_mode="r")
        final.append(self._write_file(seqs[:n], np.array(arr[:n])))
      break
    self.manifest["batches"] = final
    self._write_manifest()
    self._remove_unlisted()

  def _check_batch(self, batch: dict[str, Any]) -> str | None:
    path = os.path.join(self.dir, batch["file"])
    if not os.path.exists(path):
      return "missing"
    if os.path.getsize(path) != batch["bytes"]:
      return f"{os.path.getsize(path)} bytes, expected {batch['bytes']}"
    if _crc32(path) != batch["crc32"]:
      return "CRC-32 mismatch"
    return None

  def _replace_all(self) -> None:
    for name in os.listdir(self.dir):
      os.remove(os.path.join(self.dir, name))
    self._write_manifest()

  def _remove_unlisted(self) -> None:
    listed = {b["file"] for b in self.manifest["batches"]} | {MANIFEST}
    for name in os.listdir(self.dir):
      if name not in listed:
        os.remove(os.path.join(self.dir, name))

  # -- the background thread
  def _start(self) -> None:
    """Started on the first snapshot, so a failed compile leaves no thread behind."""
    if self._thread is not None:
      return
    self._thread = threading.Thread(target=self._loop, name="ih_jax-snapshots", daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    while True:
      item = self._queue.get()
      try:
        if item is None:        # close
          return
        if self._error is None and not self._aborted:
          if item[0] == "sync":
            self._write_batch()
          else:
            _, seqs, flat = item
            # Waits for the chunk that produced it (not the main thread), copies to host.
            host = np.asarray(flat)[:self.num_runs, :self.layout.size]
            self._buf.append((seqs, np.array(host, np.float32)))
            if len(self._buf) >= self.batch_len:
              self._write_batch()
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e
      finally:
        self._queue.task_done()

  def _write_batch(self) -> None:
    if not self._buf:
      return
    seqs = [s for s, _ in self._buf]
    block = np.stack([a for _, a in self._buf])
    self._buf = []
    self.manifest["batches"].append(self._write_file(seqs, block))
    self._write_manifest()

  def _write_file(self, seqs: list[int], block: np.ndarray) -> dict[str, Any]:
    name = f"b{self.manifest['next_id']:06d}.npy"
    self.manifest["next_id"] += 1
    path = os.path.join(self.dir, name)
    _atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(block),
                                                            allow_pickle=False))
    return dict(file=name, seqs=[int(s) for s in seqs], crc32=_crc32(path),
                bytes=os.path.getsize(path), fp=fingerprints(block).tolist())

  def _write_manifest(self) -> None:
    data = json.dumps(self.manifest).encode()
    _atomic_write(os.path.join(self.dir, MANIFEST), lambda f: f.write(data))

  # -- the caller's side
  def _raise(self) -> None:
    if self._error is not None:
      e, self._error = self._error, None
      raise SnapshotError(f"writing snapshots to {self.dir} failed: {e!r}") from e

  def add(self, seqs: int, flat_RP: Any) -> None:
    """Queues every run's flat params [R_pad, P_pad] at `seqs` for the writer thread
    (device arrays are fine); blocks while the queue is full and raises an earlier
    write error."""
    self._raise()
    self._start()
    self._queue.put(("snap", int(seqs), flat_RP))

  def sync(self) -> None:
    """Writes the buffered snapshots as a batch and waits until all are on disk."""
    if self._thread is None:
      return
    self._queue.put(("sync",))
    self._queue.join()
    self._raise()

  def abort(self) -> None:
    """Stops the thread, dropping what is queued or buffered (as a crash would)."""
    if self._thread is None:
      return
    self._aborted = True
    self._queue.put(None)
    self._thread.join()
    self._thread = None
    self._buf = []

  def close(self) -> None:
    """Writes what is buffered, stops the thread (idempotent)."""
    if self._thread is None:
      return
    try:
      self.sync()
    finally:
      self._queue.put(None)
      self._thread.join()
      self._thread = None
