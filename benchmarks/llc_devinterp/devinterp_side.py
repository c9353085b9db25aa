"""devinterp's LLC estimate (devinterp.slt.sampling.sample + devinterp.slt.llc.compute_llc,
version 2.0.1, PyTorch) on the shared models and w*.

  /tmp/devinterp_env/bin/python benchmarks/llc_devinterp/devinterp_side.py \
      [--data /tmp/llc_devinterp_data] [--models linear,mlp] [--stream epoch|iid]

devinterp 2.0.1 is built around language models: the data set is a HuggingFace Dataset
with an "input_ids" column and a custom loss_fn(model, input_ids) returns the per-token
loss [batch, seq - 1]. Each row here is [i, i], i the index of a sample of the shared
(X, y): seq = 2, one "token" of loss per sample, loss_fn looks (x_i, y_i) up.

--stream epoch (default): rows 0..n-1, devinterp's own data path: a seeded shuffle,
  drop_last, the first epoch replayed (itertools.cycle), the same order for every chain.
--stream iid: rows are n_steps * batch indices drawn uniformly with replacement and each
  chain shuffles them with its own seed: the data stream ih_jax uses (independent,
  with-replacement minibatches, different per chain), through devinterp's own code.

Prints one JSON object per run. Settings: common_settings.json.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from devinterp.slt.llc import compute_llc
from devinterp.slt.sampling import sample

HERE = pathlib.Path(__file__).resolve().parent


def load_settings() -> dict[str, Any]:
  s = json.loads((HERE / "common_settings.json").read_text())
  s.pop("_comment", None)
  return s


def linear_model(d: pathlib.Path) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
  m = torch.nn.Linear(10, 1, bias=False)
  with torch.no_grad():
    m.weight.copy_(torch.from_numpy(np.load(d / "linear_w.npy"))[None])
  return m, np.load(d / "linear_X.npy"), np.load(d / "linear_y.npy")


def mlp_model(d: pathlib.Path) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
  m = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
  with torch.no_grad():
    for layer, w, b in ((m[0], "W1", "b1"), (m[2], "W2", "b2")):
      layer.weight.copy_(torch.from_numpy(np.load(d / f"mlp_{w}.npy")))
      layer.bias.copy_(torch.from_numpy(np.load(d / f"mlp_{b}.npy")))
  return m, np.load(d / "mlp_X.npy"), np.load(d / "mlp_y.npy")


def make_loss_fn(X: np.ndarray, y: np.ndarray):
  """loss_fn(model, input_ids [b, 2]) -> [b, 1]: 0.5 (y_i - f(x_i))^2 per sample; devinterp
  averages it over the batch (the gradient of its mean drives SGLD)."""
  Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

  def loss_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    i = input_ids[:, 0]
    return (0.5 * (yt[i] - model(Xt[i])[:, 0]) ** 2)[:, None]
  return loss_fn


def quadratic_expectation(X: np.ndarray, y: np.ndarray, w: np.ndarray, ids: np.ndarray,
                          s: dict[str, Any], nbeta: float) -> float:
  """The linear model's expected draws-only estimate, over SGLD's injected noise only,
  given the exact minibatch sequence a chain saw (ids [steps, b]), in float64.

  With delta = w - w*, G_t = mean_t r_i x_i (r the residuals at w*), H_t = mean_t x_i x_i':
  delta' = B_t delta + eps/2 nb G_t + sqrt(eps) xi, B_t = I - eps/2 (nb H_t + gamma); the
  excess L_t(w) - L_t(w*) = -G_t.delta + delta' H_t delta / 2 is quadratic, so its mean
  follows from delta's mean mu_t and covariance P_t, which evolve exactly. This separates
  the data order's effect (the -G_t.mu_t and mu' H mu terms) from the sampler's."""
  X, y, w = (np.asarray(a, np.float64) for a in (X, y, w))
  eps, gamma = s["step_size"], s["gamma"]
  r = y - X @ w
  d = X.shape[1]
  mu, P, acc = np.zeros(d), np.zeros((d, d)), []
  for t, i in enumerate(ids):
    xb = X[i]
    H = xb.T @ xb / len(i)
    G = xb.T @ r[i] / len(i)
    if t >= s["num_burnin"]:
      acc.append(-G @ mu + 0.5 * (mu @ H @ mu + np.sum(H * P)))
    B = np.eye(d) - 0.5 * eps * (nbeta * H + gamma * np.eye(d))
    mu = B @ mu + 0.5 * eps * nbeta * G
    P = B @ P @ B.T + eps * np.eye(d)
  return float(nbeta * np.mean(acc))


def run(name: str, model: torch.nn.Module, X: np.ndarray, y: np.ndarray,
        s: dict[str, Any], stream: str, seed: int) -> dict[str, Any]:
  n = X.shape[0]
  nbeta = s["nbeta"] if s["nbeta"] is not None else n / math.log(n)
  steps = s["num_burnin"] + s["num_draws"]
  bs = s["batch_size"]
  if stream == "epoch":
    rows = np.arange(n)
    # Cover the whole (drop_last) epoch: init_loss then averages w*'s loss over exactly
    # the samples the chains cycle through (the default, 32 batches, is reported below).
    init_batches = n // bs
    match = True
  else:
    rows = np.random.default_rng(seed).integers(0, n, steps * bs)
    init_batches = 32
    match = False
  ds = Dataset.from_dict({"input_ids": np.stack([rows, rows], 1)}).with_format("torch")
  loss_fn = make_loss_fn(X, y)
  out_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"devinterp_{name}_"))
  t0 = time.perf_counter()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    samples = sample(
        model, ds, {}, lr=s["step_size"], n_beta=nbeta, localization=s["gamma"],
        num_chains=s["num_chains"], num_draws=s["num_draws"], batch_size=bs,
        num_burnin_steps=s["num_burnin"], num_init_loss_batches=init_batches,
        match_sampling_input_ids_across_chains=match, init_seed=100 + seed,
        device="cpu", output_path=out_dir / "samples.zarr", loss_fn=loss_fn)
    res = compute_llc(samples)
  wall = time.perf_counter() - t0

  C = s["num_chains"]
  dset = samples.dataset
  official = np.asarray(res.llc_per_chain.values, np.float64)   # burn-in included
  init_loss = float(dset.init_loss.values.mean())
  # The draws only (burn-in dropped, ih_jax's convention), against the same init_loss.
  draws = np.asarray(dset.sampling_loss.values, np.float64).mean((2, 3))   # [C, draws]
  draws_only = nbeta * (draws.mean(1) - init_loss)
  # Paired with w*'s loss on each step's own minibatch, as ih_jax does (same draws).
  with torch.no_grad():
    per_sample_star = loss_fn(model, torch.arange(n)[:, None].repeat(1, 2))[:, 0].double().numpy()
  ids = np.asarray(dset.sampling_input_ids_micro.values)[..., 0]          # [C, steps, b]
  star_per_step = per_sample_star[ids].mean(-1)                          # [C, steps]
  micro = np.asarray(dset.sampling_loss_micro.values, np.float64).mean((2, 3))
  paired = nbeta * (micro - star_per_step)[:, s["num_burnin"]:].mean(1)
  out = {
      "llc_mean": float(draws_only.mean()), "llc_std": float(draws_only.std()),
      "llc_se": float(draws_only.std(ddof=1) / math.sqrt(C)),
      "llc_chains": draws_only.tolist(),
      "devinterp_compute_llc_mean": float(res.llc_mean), "devinterp_compute_llc_std":
      float(res.llc_std), "devinterp_compute_llc_se": float(official.std(ddof=1) / math.sqrt(C)),
      "paired_llc_mean": float(paired.mean()),
      "paired_llc_se": float(paired.std(ddof=1) / math.sqrt(C)),
      "init_loss": init_loss, "init_batches": init_batches,
      "full_data_loss_star": float(per_sample_star.mean()),
      "mean_w_star_loss_on_sampled_batches": float(star_per_step[:, s["num_burnin"]:].mean()),
      "wall_s_sample_and_compute_llc": wall,
  }
  if name == "linear":
    w = model.weight.detach().numpy()[0]
    chains_th = [quadratic_expectation(X, y, w, ids[c], s, nbeta)
                 for c in range(1 if stream == "epoch" else C)]   # epoch: one shared order
    out["quadratic_expectation_given_batches"] = float(np.mean(chains_th))
    if stream == "epoch":
      # Is the epoch order's effect systematic? Other seeded orders of the same kind
      # (a shuffled drop_last epoch, replayed), evaluated the same way.
      others = []
      for k in range(4):
        perm = np.random.default_rng(1000 + k).permutation(n)[: (n // bs) * bs]
        epoch = perm.reshape(-1, bs)
        order = np.concatenate([epoch] * (steps // len(epoch) + 1))[:steps]
        others.append(quadratic_expectation(X, y, w, order, s, nbeta))
      out["quadratic_expectation_other_epoch_orders"] = others
      iid = np.random.default_rng(2000).integers(0, n, (steps, bs))
      out["quadratic_expectation_one_iid_sequence"] = quadratic_expectation(X, y, w, iid, s, nbeta)
  if stream == "epoch":
    # With the default num_init_loss_batches = 32 the init loss would be w*'s loss on the
    # first 32 of the 39 batches of the (shared) epoch: the same ids as steps 0..31.
    init32 = float(star_per_step[0, :32].mean())
    out["init_loss_recomputed_check"] = float(star_per_step[0, :init_batches].mean())
    out["llc_mean_if_default_32_init_batches"] = float((draws_only + nbeta * (init_loss - init32)).mean())
  shutil.rmtree(out_dir, ignore_errors=True)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", default="/tmp/llc_devinterp_data")
  ap.add_argument("--models", default="linear,mlp")
  ap.add_argument("--stream", choices=("epoch", "iid"), default="epoch")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--num-chains", type=int, default=None,
                  help="override common_settings.json's num_chains")
  args = ap.parse_args()
  torch.set_num_threads(args.threads)   # tiny tensors: more threads only add overhead
  s = load_settings()
  if args.num_chains is not None:
    s["num_chains"] = args.num_chains
  d = pathlib.Path(args.data)
  models = {"linear": linear_model, "mlp": mlp_model}
  import importlib.metadata as md
  res: dict[str, Any] = {"side": "devinterp", "devinterp": md.version("devinterp"),
                         "torch": torch.__version__, "stream": args.stream, "settings": s,
                         "torch_threads": args.threads}
  for name in args.models.split(","):
    m, X, y = models[name](d)
    res[name] = run(name, m, X, y, s, args.stream, args.seed)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
