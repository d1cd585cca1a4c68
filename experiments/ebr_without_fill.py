"""EBR's finished seeds re-evaluated without the test-time fill.

    python experiments/ebr_without_fill.py RUNS/mfeat/ebr OUT

For each ``seed0..2`` under the first argument (a ``compare`` method directory),
copies the run to ``OUT/seed<k>`` and evaluates the same checkpoint under the
same protocol with a hook that keeps EBR's round trip ``h_m^-1(h_m(z_m))`` for
present cells and leaves missing cells to the model's own generator (no
``h_m^-1(g_j)`` fill). Prints both tables' accuracy, mean ± std over seeds.
"""

import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np

from modalimmune_jax import methods as methods_lib
from modalimmune_jax import train
from modalimmune_jax.config import base_config, flatten, with_overrides


def without_fill(config, dataset):
  def build(model):
    method = methods_lib.from_config(config, model, dataset)

    def predict_hook(params, state):
      full = method.predict_hook(params, state)

      def hook(z, present):
        f, _ = full(z, present)
        return jnp.where(present[..., None], f, z).astype(z.dtype), present
      return hook
    return method._replace(predict_hook=predict_hook)
  return build


def main(src_root, out_root):
  rows = {}
  for seed in (0, 1, 2):
    src, dst = (os.path.join(r, f"seed{seed}") for r in (src_root, out_root))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "results.json"))
    saved = json.load(open(os.path.join(dst, "config.json")))
    config = with_overrides(base_config(), {k: tuple(v) if isinstance(v, list) else v
                                            for k, v in flatten(saved).items()})
    summary = train.train_and_evaluate(config, dst,
                                       method=without_fill(config, train.load_data(config)))
    before = json.load(open(os.path.join(src, "results.json")))["protocol"]["rows"]
    for a, b in zip(before, summary["protocol"]["rows"]):
      rows.setdefault(a["condition"], []).append((a["accuracy"], b["accuracy"]))
  print("| condition | with fill | without fill |\n|---|---:|---:|")
  for condition, values in rows.items():
    v = 100 * np.array(values)
    print(f"| {condition} | {v[:, 0].mean():.2f} ± {v[:, 0].std(ddof=1):.2f} | "
          f"{v[:, 1].mean():.2f} ± {v[:, 1].std(ddof=1):.2f} |")


if __name__ == "__main__":
  main(*sys.argv[1:3])
