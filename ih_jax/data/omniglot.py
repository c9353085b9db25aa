"""Omniglot images from the official zip archives or from tensorflow-datasets.

Both readers return the same `OmniglotImages` for the same characters:

* **Class identity** is TFDS's global `label` (the file-name id minus one:
  `0108_01.png` -> 107), which is consistent across the four archives and the
  TFDS splits; its readable name is (alphabet, character folder), e.g.
  ("Greek", "character01"). Characters are stored in label order; the same
  character found twice (Greek and Latin are in both small archives, and every
  small-archive character is also in `images_background`) is counted once.
* **Drawing order** within a character is by content: the SHA-256 of the packed
  ink bitmap. TFDS records carry no drawer id, so this is the one order both
  paths can reproduce; "drawing 0" is a fixed, arbitrary one of the 20.
* **Pixels** become a boolean ink mask (True = stroke). The 1-bit PNGs decode to
  {0, 1} through PIL/numpy and to {0, 255} (three channels) through TensorFlow or
  OpenCV; `ink_mask` thresholds at half the image's maximum, so every decode
  convention gives the same mask.

The archive reader needs only `zipfile` and Pillow. The TFDS reader needs
`tensorflow-datasets` (pip install -e '.[omniglot]'), and TensorFlow only to
*build* the dataset (the array_record build is then read without TF).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zipfile
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

# data.source values that read Omniglot (pixels, or features of a trained conv encoder).
OMNIGLOT_SOURCES = ("omniglot_pixels", "omniglot_conv")

OFFICIAL_ARCHIVES = ("images_background", "images_evaluation",
                     "images_background_small1", "images_background_small2")
# The SHA-256 digests TFDS checks (tensorflow_datasets/url_checksums/omniglot.txt).
ARCHIVE_SHA256 = {
    "images_background": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    "images_background_small1": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
ARCHIVE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
IMAGE_SIZE = 105
TFDS_NAME = "omniglot"

GET_DATA_HELP = (
    "Get Omniglot in one of three ways: (1) the official zip archives "
    f"({', '.join(n + '.zip' for n in OFFICIAL_ARCHIVES)}; any subset, from "
    "https://github.com/brendenlake/omniglot/tree/master/python) in a folder passed as "
    "data.omniglot_dir (reader 'archives', no TensorFlow); (2) data.omniglot_reader='tfds' "
    "with all four archives in data.omniglot_dir, built offline as TFDS's manual_dir "
    "(needs pip install -e '.[omniglot]'); (3) data.omniglot_reader='tfds' with "
    "data.tfds_download=True on a machine with internet")


@dataclasses.dataclass(frozen=True)
class OmniglotImages:
  """Characters in label order, each with its drawings in content order."""
  ink: np.ndarray            # [C, D, 105, 105] bool, True = stroke
  labels: np.ndarray         # [C] int64 TFDS global labels, increasing
  alphabets: tuple[str, ...]
  characters: tuple[str, ...]

  @property
  def names(self) -> list[str]:
    """Each character as "ALPHABET/CHARACTER"."""
    return [f"{a}/{c}" for a, c in zip(self.alphabets, self.characters)]

  def take(self, idx: Sequence[int] | np.ndarray) -> "OmniglotImages":
    """The characters at positions `idx`, in that order."""
    idx = np.asarray(idx, np.int64)
    return OmniglotImages(self.ink[idx], self.labels[idx],
                          tuple(self.alphabets[i] for i in idx),
                          tuple(self.characters[i] for i in idx))


def ink_mask(img: np.ndarray) -> np.ndarray:
  """[H, W] or [H, W, channels] image in any decode convention -> bool ink (True = stroke)."""
  a = np.asarray(img)
  if a.ndim == 3:
    a = a[..., 0]
  if a.ndim != 2:
    raise ValueError(f"expected an [H, W] or [H, W, C] image, got shape {np.shape(img)}")
  a = a.astype(np.float32)
  # Ink is 0 on white; white is 1 (PIL/numpy) or 255 (TF, OpenCV, PIL 'L').
  return a < 0.5 * max(float(a.max()), 1.0)


def drawing_key(ink: np.ndarray) -> bytes:
  """The content key that orders the drawings of a character."""
  return hashlib.sha256(np.packbits(np.asarray(ink, bool)).tobytes()).digest()


def _assemble(groups: dict[int, tuple[str, str, list[np.ndarray]]],
              where: str) -> OmniglotImages:
  if not groups:
    raise ValueError(f"no Omniglot images found in {where}")
  labels = np.asarray(sorted(groups), np.int64)
  counts = {lab: len(groups[lab][2]) for lab in labels}
  if len(set(counts.values())) != 1:
    lo = min(counts, key=counts.get)
    raise ValueError(
        f"{where}: characters have different numbers of drawings ({min(counts.values())} for "
        f"{groups[lo][0]}/{groups[lo][1]}, up to {max(counts.values())}); the data is "
        "incomplete or not Omniglot")
  ink = np.stack([np.stack(sorted(groups[lab][2], key=drawing_key)) for lab in labels])
  if ink.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
    raise ValueError(f"{where}: images have shape {ink.shape[2:]}, expected 105x105")
  return OmniglotImages(ink, labels, tuple(groups[lab][0] for lab in labels),
                        tuple(groups[lab][1] for lab in labels))


def _add(groups: dict, label: int, alphabet: str, character: str, ink: np.ndarray,
         where: str) -> None:
  if label in groups:
    a, c, _ = groups[label]
    if (a, c) != (alphabet, character):
      raise ValueError(f"{where}: label {label} names both {a}/{c} and {alphabet}/{character}")
  else:
    groups[label] = (alphabet, character, [])
  groups[label][2].append(ink)


# ----------------------------------------------------------------------------- archives

def find_archives(directory: str, archives: Sequence[str] = ()) -> list[str]:
  """Paths of the requested archives (default: every official one in `directory`)."""
  if not directory:
    raise FileNotFoundError("data.omniglot_dir is not set. " + GET_DATA_HELP)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Omniglot folder {directory!r} does not exist. " + GET_DATA_HELP)
  if archives:
    paths = [os.path.join(directory, a if a.endswith(".zip") else a + ".zip") for a in archives]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"Omniglot archive(s) {missing} not found. " + GET_DATA_HELP)
    return paths
  paths = [os.path.join(directory, n + ".zip") for n in OFFICIAL_ARCHIVES]
  paths = [p for p in paths if os.path.exists(p)]
  if not paths:
    raise FileNotFoundError(
        f"no official Omniglot archive in {directory!r} (found: "
        f"{sorted(os.listdir(directory))[:10]}). " + GET_DATA_HELP)
  return paths


def file_sha256(path: str) -> str:
  """The hex SHA-256 of a file's contents (read in 1 MiB chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def read_archives(paths: Iterable[str]) -> OmniglotImages:
  """Reads Omniglot zip archives (any subset of the official four), no TensorFlow.

  Layout inside each zip: `<root>/<Alphabet>/characterNN/<id>_<drawer>.png`. A
  character already read from an earlier archive is skipped after checking that
  its file names and CRCs match.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = list(paths)
  groups: dict[int, tuple[str, str, list[np.ndarray]]] = {}
  seen: dict[int, tuple[str, frozenset]] = {}  # label -> (archive, {(file, crc)})
  for path in paths:
    try:
      zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f"{path!r} is not a readable zip archive ({e})") from None
    with zf:
      by_label: dict[int, list[zipfile.ZipInfo]] = {}
      for info in zf.infolist():
        parts = info.filename.split("/")
        if info.is_dir() or not parts[-1].endswith(".png"):
          continue
        if len(parts) != 4 or "_" not in parts[3]:
          raise ValueError(f"{path}: unexpected member {info.filename!r}; expected "
                           "<root>/<Alphabet>/characterNN/<id>_<drawer>.png")
        by_label.setdefault(int(parts[3].split("_")[0]) - 1, []).append(info)
      for label, infos in sorted(by_label.items()):
        files = frozenset((i.filename.split("/")[3], i.CRC) for i in infos)
        if label in seen:
          if seen[label][1] != files:
            raise ValueError(f"character {label} differs between {seen[label][0]} and {path}")
          continue
        seen[label] = (path, files)
        for info in infos:
          _, alphabet, character, _ = info.filename.split("/")
          try:
            with Image.open(io.BytesIO(zf.read(info))) as im:
              ink = ink_mask(np.asarray(im))
          except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
            # Bad CRC / deflate data / PNG: say which archive and member, not just zlib's text.
            raise ValueError(
                f"Omniglot archive {path}: member {info.filename!r} is corrupt "
                f"({type(e).__name__}: {e}); download the archive again (official copies: "
                "https://github.com/brendenlake/omniglot/tree/master/python)") from None
          _add(groups, label, alphabet, character, ink, path)
  return _assemble(groups, ", ".join(os.path.basename(p) for p in paths))


# ----------------------------------------------------------------------------- TFDS

def import_tfds() -> Any:
  """The `tensorflow_datasets` module, or an ImportError saying how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "data.omniglot_reader='tfds' needs tensorflow-datasets: pip install -e '.[omniglot]' "
        f"(or use the default reader 'archives', which needs no TensorFlow) ({e})") from None
  return tfds


def tfds_builder(data_dir: str = "", manual_dir: str = "", download: bool = False) -> Any:
  """The TFDS `omniglot` builder, prepared (built) if needed.

  An unprepared dataset is built offline from `manual_dir` (all four official
  archives under their original names: the builder reads every split, and TFDS
  checks their checksums), or downloaded when `download` is set. Building needs
  TensorFlow; it is written as array_record so that reading does not.
  """
  tfds = import_tfds()
  builder = tfds.builder(TFDS_NAME, data_dir=data_dir or None)
  if builder.is_prepared():
    return builder
  if manual_dir:
    missing = [n + ".zip" for n in OFFICIAL_ARCHIVES
               if not os.path.exists(os.path.join(manual_dir, n + ".zip"))]
    if missing:
      raise FileNotFoundError(
          f"building TFDS omniglot from manual_dir {manual_dir!r} needs all four official "
          f"archives; missing: {missing}. With only some archives, use "
          "data.omniglot_reader='archives' (reads any subset, no TensorFlow). " + GET_DATA_HELP)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    builder.download_and_prepare(download_config=config, file_format="array_record")
  elif download:
    builder.download_and_prepare(file_format="array_record")
  else:
    raise FileNotFoundError(
        f"TFDS omniglot is not prepared in data_dir {builder.data_dir!r}. Set "
        "data.omniglot_dir to a folder holding the four official archives (offline build), "
        "or data.tfds_download=True (needs internet), or point data.tfds_data_dir at a built "
        "copy. " + GET_DATA_HELP)
  return builder


def _tfds_records(builder: Any, split: str) -> Iterable[dict[str, Any]]:
  try:
    source = builder.as_data_source(split)
  except NotImplementedError as e:
    # A TFRecord build (e.g. prepared by tfds.load) has no random-access source.
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise RuntimeError(
          f"TFDS omniglot in {builder.data_dir!r} cannot be read without TensorFlow ({e}); "
          "rebuild it with file_format='array_record' or install tensorflow") from None
    yield from import_tfds().as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return
  for i in range(len(source)):
    yield source[i]


def read_tfds(splits: Sequence[str] = ("train", "test"), data_dir: str = "",
              manual_dir: str = "", download: bool = False) -> OmniglotImages:
  """Reads TFDS `omniglot` splits (default train + test = all 1623 characters).

  A character in several splits (e.g. `small1` and `train`) is counted once,
  after checking that its drawings are the same.
  """
  builder = tfds_builder(data_dir, manual_dir, download)
  groups: dict[int, tuple[str, str, list[np.ndarray]]] = {}
  for split in splits:
    split_groups: dict[int, tuple[str, str, list[np.ndarray]]] = {}
    names = None
    for ex in _tfds_records(builder, split):
      if names is None:  # read after the source opens (the builder sets them when building)
        names = builder.info.features["alphabet"].names
      character = f"character{int(ex['alphabet_char_id']) + 1:02d}"
      _add(split_groups, int(ex["label"]), names[int(ex["alphabet"])], character,
           ink_mask(ex["image"]), f"tfds {split}")
    for label, (alphabet, character, inks) in split_groups.items():
      if label not in groups:
        groups[label] = (alphabet, character, inks)
      elif (groups[label][:2] != (alphabet, character) or
            sorted(map(drawing_key, groups[label][2])) != sorted(map(drawing_key, inks))):
        raise ValueError(f"TFDS omniglot: character {label} differs between splits")
  return _assemble(groups, f"TFDS omniglot splits {tuple(splits)}")


# ----------------------------------------------------------------------------- order, pixels

def class_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """A seeded permutation of the characters (indices into `labels`).

  Characters are sorted by SHA-256 of (seed, label), so the order of any subset
  is the restriction of the full set's order, independent of numpy and JAX
  versions. seed < 0 keeps label order.
  """
  labels = np.asarray(labels)
  if seed < 0:
    return np.arange(len(labels))
  keys = [hashlib.sha256(f"omniglot:{seed}:{int(l)}".encode()).digest() for l in labels]
  return np.asarray(sorted(range(len(labels)), key=keys.__getitem__), np.int64)


def box_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] area-averaging weights (exact overlap of the pixel intervals)."""
  edges = np.arange(n_out + 1) * (n_in / n_out)
  lo, hi = edges[:-1, None], edges[1:, None]
  px = np.arange(n_in)[None, :]
  overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
  return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def downsample(ink: np.ndarray, size: int) -> np.ndarray:
  """[..., 105, 105] bool ink -> [..., size, size] float32 ink fraction (area average)."""
  ink = np.asarray(ink)
  if size == ink.shape[-1]:
    return ink.astype(np.float32)
  r = box_matrix(ink.shape[-1], size)
  return np.matmul(np.matmul(r, ink.astype(np.float32)), r.T)
