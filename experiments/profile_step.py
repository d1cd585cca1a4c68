"""Where the time of the MOSI-shaped training step goes.

    python experiments/profile_step.py [--steps 20] [--reps 5] [--no-trace]
                                       [--old PATH/TO/model.py]

The workload of ``bench_train.py``'s MOSI-shaped row: synthetic data, three
sequence modalities of 50 frames (widths text 300 / audio 74 / vision 35,
variable lengths), regression, batch 32, the default model (hidden 64, one
encoder layer, one fusion layer, 4 heads, mlp_ratio 2, property vectors and
reconstruction on), plain training with clipping and AdamW.

Prints

1. the step's time alone (device-resident batches, ``block_until_ready``
   after ``--steps`` steps, median of ``--reps``);
2. XLA's cost analysis of the compiled step (flops, bytes accessed);
3. the time of its parts, each jitted alone: the model's forward (eval and
   train mode), forward + backward of the loss, one encoder per modality
   (forward + backward), and the rest (hook, reconstruction, fusion, head,
   loss) given the embeddings;
4. with the trace (default), the step's compiled ops by total time from a
   ``jax.profiler`` trace (the CPU runtime's thunks, matched to the
   optimised HLO).

``--old PATH`` loads another ``model.py`` (e.g. ``git show
HEAD:modalimmune_jax/model.py > /tmp/old_model.py``) and times its step
against the current one, alternating the two in one process (median of the
per-round ratios), on the same parameters and batches.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.methods.base import reconstruction_loss  # noqa: E402
from modalimmune_jax.step import shard_batch  # noqa: E402


def config():
  import synthetic
  cfg = synthetic.get_config("mosi_shaped")
  cfg.data.synthetic.num_samples = (1024, 64, 64)
  return cfg


def load_model_class(path):
  spec = importlib.util.spec_from_file_location("_other_model", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.MultimodalModel


def build(cfg, model_class=None, dataset=None):
  """``train.setup`` with ``model_class`` in place of the library's model."""
  if model_class is None:
    return train.setup(cfg, dataset=dataset)
  saved = train.MultimodalModel
  train.MultimodalModel = model_class
  try:
    return train.setup(cfg, dataset=dataset)
  finally:
    train.MultimodalModel = saved


def fresh(state):
  """A copy of the state (the step donates its input)."""
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def time_steps(step_fn, state, batches, keys, steps):
  t0 = time.perf_counter()
  for s in range(steps):
    state, metrics = step_fn(state, batches[s % len(batches)], keys[s % len(keys)])
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t0) / steps * 1e3, state


def time_fn(fn, args, n):
  jax.block_until_ready(fn(*args))
  best = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    best.append((time.perf_counter() - t0) / n * 1e3)
  return statistics.median(best)


def cost(compiled):
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return {k: c.get(k, float("nan")) for k in ("flops", "bytes accessed", "transcendentals")}


def parts(run, batch, key, n):
  """Times of the model's parts, each jitted alone (ms)."""
  model_fns, params = run.model, run.state.params
  graphdef = model_fns.graphdef
  local = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), batch)
  rows = {}

  def loss_of(out, b):
    return model_fns.task_loss(out["outputs"], b["labels"]) + reconstruction_loss(
        out, b["presence"])

  fwd_eval = jax.jit(lambda p, b: model_fns.apply(p, b, train=False)["outputs"])
  fwd_train = jax.jit(lambda p, b, k: loss_of(model_fns.apply(p, b, k), b))
  fwd_bwd = jax.jit(jax.value_and_grad(lambda p, b, k: loss_of(model_fns.apply(p, b, k), b)))
  rows["forward (eval, outputs)"] = time_fn(fwd_eval, (params, local), n)
  rows["forward (train, loss)"] = time_fn(fwd_train, (params, local, key), n)
  rows["forward + backward (loss)"] = time_fn(fwd_bwd, (params, local, key), n)
  flops = cost(fwd_bwd.lower(params, local, key).compile())["flops"]
  rows_flops = {"forward + backward (loss)": flops}

  for m in model_fns.names:
    def enc_loss(p, x, mask, m=m):
      model = nnx.merge(graphdef, p)
      return jnp.sum(model.encoders[m](x, mask, train=True, rngs=None) ** 2)
    fn = jax.jit(jax.value_and_grad(enc_loss))
    args = (params, local["inputs"][m], local["masks"][m])
    rows[f"encoder {m} {tuple(args[1].shape)} fwd+bwd"] = time_fn(fn, args, n)
    rows_flops[f"encoder {m} {tuple(args[1].shape)} fwd+bwd"] = cost(
        fn.lower(*args).compile())["flops"]

  # the rest given the embeddings: a hook replaces z by an input (so the
  # encoders' outputs are dead code and XLA drops them)
  z0 = fwd_embeddings = jax.jit(lambda p, b: model_fns.apply(p, b, train=False)["embeddings"])(
      params, local)
  del fwd_embeddings

  def rest_loss(p, z, b, k):
    hook = lambda _, present: (z, present)
    return loss_of(model_fns.apply(p, b, k, hook=hook), b)
  fn = jax.jit(jax.value_and_grad(rest_loss, argnums=(0, 1)))
  rows["fusion + reconstruction + head + loss fwd+bwd (encoders dead)"] = time_fn(
      fn, (params, z0, local, key), n)
  return rows, rows_flops


def trace_ops(step_fn, state, batches, keys, steps, top):
  """Per-op totals of the compiled step from a jax.profiler trace."""
  hlo = step_fn.lower(state, batches[0], keys[0]).compile().as_text()
  lines = {}
  for line in hlo.splitlines():
    mt = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if mt:
      lines.setdefault(mt.group(1), mt.group(2))
  tmp = tempfile.mkdtemp(prefix="profile_step_")
  _, state = time_steps(step_fn, state, batches, keys, 2)
  jax.profiler.start_trace(tmp, create_perfetto_trace=True)
  _, state = time_steps(step_fn, state, batches, keys, steps)
  jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(paths[0]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in lines:
      total[e["name"]] += e.get("dur", 0.0)
      count[e["name"]] += 1
  step_total = sum(total.values()) / steps / 1e3
  print(f"\nops of the compiled step from the trace: {step_total:.2f} ms of op time per "
        f"step (summed over threads, {len(total)} distinct ops); top {top}:")
  print(f"{'ms/step':>8} {'share':>6}  op = HLO")
  by_kind = collections.Counter()
  for name, us in total.items():
    text = lines[name]
    kind = re.search(r"\b(fusion|dot|convolution|custom-call|reduce|transpose|copy|"
                     r"while|conditional|scatter|gather|sort|call)\(", text)
    calls = re.search(r"calls=%?([\w.\-]+)", text)
    by_kind[(kind.group(1) if kind else "other")] += us
  for name, us in total.most_common(top):
    text = lines[name]
    print(f"{us / steps / 1e3:8.3f} {us / sum(total.values()):6.1%}  {name} = {text[:150]}")
  print("\nby kind (ms/step): " + ", ".join(
      f"{k} {v / steps / 1e3:.2f}" for k, v in by_kind.most_common()))
  return state


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--no-trace", action="store_true")
  parser.add_argument("--no-parts", action="store_true")
  parser.add_argument("--old", default="", help="another model.py to time against")
  args = parser.parse_args()

  cfg = config()
  run = build(cfg)
  n_batches = 16
  batches = [shard_batch(run.batches(s), run.mesh) for s in range(n_batches)]
  key = jax.random.key(0)
  keys = [jax.random.fold_in(key, s) for s in range(n_batches)]
  jax.block_until_ready((batches, keys))
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
        f"params {sum(x.size for x in jax.tree.leaves(run.state.params)):,}")

  t0 = time.perf_counter()
  compiled = run.step_fn.lower(run.state, batches[0], keys[0]).compile()
  print(f"compile {time.perf_counter() - t0:.2f} s")
  c = cost(compiled)
  print(f"XLA cost analysis of the step: {c['flops'] / 1e6:.1f} MFLOP, "
        f"{c['bytes accessed'] / 1e6:.1f} MB accessed, "
        f"{c['transcendentals'] / 1e6:.2f} M transcendentals")

  state = fresh(run.state)
  _, state = time_steps(run.step_fn, state, batches, keys, 3)
  if args.old:
    old = build(cfg, load_model_class(args.old), dataset=run.dataset)
    same = jax.tree.structure(old.state.params) == jax.tree.structure(run.state.params)
    print(f"old model {args.old}: params pytree {'same' if same else 'DIFFERENT'}")
    old_state = fresh(run.state) if same else fresh(old.state)
    _, old_state = time_steps(old.step_fn, old_state, batches, keys, 3)
    new_t, old_t = [], []
    for r in range(args.reps):
      order = [("new", run.step_fn), ("old", old.step_fn)]
      if r % 2:
        order.reverse()
      for name, fn in order:
        if name == "new":
          t, state = time_steps(fn, state, batches, keys, args.steps)
          new_t.append(t)
        else:
          t, old_state = time_steps(fn, old_state, batches, keys, args.steps)
          old_t.append(t)
    ratios = [n / o for n, o in zip(new_t, old_t)]
    print(f"step: new {statistics.median(new_t):.2f} ms, old {statistics.median(old_t):.2f} ms "
          f"(medians of {args.reps} x {args.steps} steps, alternating); new/old "
          f"{statistics.median(ratios):.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
  else:
    ts = []
    for _ in range(args.reps):
      t, state = time_steps(run.step_fn, state, batches, keys, args.steps)
      ts.append(t)
    print(f"step: {statistics.median(ts):.2f} ms (median of {args.reps} x {args.steps} steps; "
          f"{', '.join(f'{x:.1f}' for x in ts)})")

  if not args.no_parts:
    rows, flops = parts(run, batches[0], keys[0], max(args.steps // 2, 5))
    print("\nparts, each jitted alone on one device (ms, MFLOP where measured):")
    for k, v in rows.items():
      f = f"  {flops[k] / 1e6:8.1f} MFLOP" if k in flops else ""
      print(f"  {v:7.2f}  {k}{f}")

  if not args.no_trace:
    trace_ops(run.step_fn, state, batches, keys, args.steps, args.top)


if __name__ == "__main__":
  main()
