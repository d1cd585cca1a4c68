"""Where the time of the MOSI-shaped training step goes.

    python experiments/profile_step.py [--steps 20] [--reps 5] [--no-trace] [--no-parts]
        [--old PATH/TO/model.py] [--model PATH/TO/model.py] [--out DIR]
    python experiments/profile_step.py --quick   # smoke run: 2 steps, 1 rep, 3 calls per part

The workload of ``bench_train.py``'s MOSI-shaped row: synthetic data, three
sequence modalities of 50 frames (widths text 300 / audio 74 / vision 35,
variable lengths), regression, batch 32, the default model (hidden 64, one
encoder layer, one fusion layer, 4 heads, mlp_ratio 2, property vectors and
reconstruction on), plain training with clipping and AdamW. Prints

1. XLA's cost analysis of the compiled step (flops, bytes accessed);
2. the step's time alone: device-resident batches, ``block_until_ready``
   after ``--steps`` steps, median of ``--reps`` (wall and process CPU time:
   on a shared machine the CPU time is the steadier of the two);
3. the time of its parts, each jitted alone: the model's forward (eval and
   train mode), forward + backward of the loss, each encoder (forward +
   backward), and the rest given the embeddings (reconstruction, fusion,
   head, loss; the encoders dead code);
4. with the trace (default), the compiled step's ops from a
   ``jax.profiler`` trace (the CPU runtime's thunks, matched to the
   optimised HLO): totals by forward / backward / other and by primitive and
   shape, and the top ops.

``--old PATH`` loads another ``model.py`` (e.g. ``git show
HEAD:modalimmune_jax/model.py > /tmp/old_model.py``) and times its step
against the current one on the same parameters and batches, alternating the
two in one process; the ratio is the median of the per-round ratios.
``--model PATH`` profiles that ``model.py`` instead of the library's. Another
``model.py``'s ``MultimodalModel`` (same constructor) is built with
:func:`modalimmune_jax.build.build_model` (``cls=``) and handed to
:func:`modalimmune_jax.train.setup` (``model=``). Runs in about a minute on 2
cores. The printed report and its figures are written with provenance to
``OUT/profile_step.{md,json}`` (``--out``, default
``experiments/results/profile_step``).
"""

from __future__ import annotations

import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from harness import (alternate, copy_tree, device_inputs, get_config, parser, time_calls,
                     timed_steps, write_results)
from modalimmune_jax import build, methods, train
from modalimmune_jax.methods.base import reconstruction_loss

REPORT: list[str] = []  # the printed lines, written to OUT/profile_step.md at the end


def say(line: str = "") -> None:
  print(line, flush=True)
  REPORT.extend(line.split("\n"))


def config():
  """``bench_train.py``'s MOSI-shaped workload."""
  return get_config("synthetic", "mosi_shaped",
                    overrides={"data.synthetic.num_samples": (1024, 64, 64)})


def load_model_class(path):
  """``MultimodalModel`` of another ``model.py`` (imported by path)."""
  spec = importlib.util.spec_from_file_location(f"_model_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.MultimodalModel


def setup(cfg, model_class=None, dataset=None):
  """``train.setup`` with a model of ``model_class`` (default: the library's)."""
  if model_class is None:
    return train.setup(cfg, dataset=dataset)
  dataset = dataset or train.load_data(cfg)
  model = build.build_model(cfg, dataset, parts=methods.model_parts(cfg), cls=model_class)
  return train.setup(cfg, dataset=dataset, model=model)


def time_steps(step_fn, state, inputs, steps):
  """``(wall ms, CPU ms, state)`` per step over ``steps`` steps, cycling ``inputs``."""
  timed = timed_steps(step_fn, state, (inputs[s % len(inputs)] for s in range(steps)))
  return timed.seconds / steps * 1e3, timed.cpu_seconds / steps * 1e3, timed.state


def cost(compiled):
  c = compiled.cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return {k: c.get(k, float("nan")) for k in ("flops", "bytes accessed", "transcendentals")}


def parts(run, batch, key, n, reps=3):
  """``{part: ms}`` and ``{part: flops}``, each part jitted alone on one device."""
  model_fns, params = run.model, run.state.params
  graphdef = model_fns.graphdef
  local = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), batch)
  times, flops = {}, {}

  def loss_of(out, b):
    return model_fns.task_loss(out["outputs"], b["labels"]) + reconstruction_loss(
        out, b["presence"])

  def add(name, fn, *args):
    times[name] = time_calls(fn, args, n, reps) * 1e3
    flops[name] = cost(fn.lower(*args).compile())["flops"]

  add("forward (eval, outputs)",
      jax.jit(lambda p, b: model_fns.apply(p, b, train=False)["outputs"]), params, local)
  add("forward (train, loss)",
      jax.jit(lambda p, b, k: loss_of(model_fns.apply(p, b, k), b)), params, local, key)
  add("forward + backward (loss)",
      jax.jit(jax.value_and_grad(lambda p, b, k: loss_of(model_fns.apply(p, b, k), b))),
      params, local, key)
  for m in model_fns.names:
    def enc_loss(p, x, mask, m=m):
      model = nnx.merge(graphdef, p)
      return jnp.sum(model.encoders[m](x, mask, train=True, rngs=None) ** 2)
    x = local["inputs"][m]
    add(f"encoder {m} {tuple(x.shape)} fwd+bwd", jax.jit(jax.value_and_grad(enc_loss)),
        params, x, local["masks"][m])

  z = jax.jit(lambda p, b: model_fns.apply(p, b, train=False)["embeddings"])(params, local)

  def rest_loss(p, z, b, k):  # the hook replaces the embeddings: the encoders are dead code
    return loss_of(model_fns.apply(p, b, k, hook=lambda _, present: (z, present)), b)
  add("reconstruction + fusion + head + loss fwd+bwd",
      jax.jit(jax.value_and_grad(rest_loss, argnums=(0, 1))), params, z, local, key)
  return times, flops


def trace_ops(step_fn, state, inputs, steps, top):
  """Prints the compiled step's ops by time, from a ``jax.profiler`` trace."""
  hlo = step_fn.lower(state, *inputs[0]).compile().as_text()
  lines = {}
  for line in hlo.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
    if match:
      lines.setdefault(match.group(1), match.group(2))
  tmp = tempfile.mkdtemp(prefix="profile_step_")
  *_, state = time_steps(step_fn, state, inputs, 2)
  jax.profiler.start_trace(tmp, create_perfetto_trace=True)
  wall, _, state = time_steps(step_fn, state, inputs, steps)
  jax.profiler.stop_trace()
  with gzip.open(glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"),
                           recursive=True)[0]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in lines:
      total[e["name"]] += e.get("dur", 0.0)
  ms = lambda us: us / steps / 1e3
  by_phase, by_prim = collections.Counter(), collections.Counter()
  for name, us in total.items():
    text = lines[name]
    op = re.search(r'op_name="([^"]+)"', text)
    op = op.group(1) if op else "?"
    phase = ("backward" if "transpose(" in op else "forward" if "jvp(" in op else
             "optimiser (cond)" if "/cond/" in op else "other")
    by_phase[phase] += us
    by_prim[(phase[:3], op.split("/")[-1], text.split(" ")[0].split("{")[0])] += us
  say(f"\nthe step's ops in a trace of {steps} steps ({wall:.1f} ms/step wall while "
      f"tracing): {ms(sum(total.values())):.2f} ms/step of op time summed over threads, "
      f"{len(total)} ops")
  say("  by phase: " + ", ".join(f"{k} {ms(v):.2f}" for k, v in by_phase.most_common()))
  say(f"  by (phase, primitive, output shape), top {top}:")
  for (phase, prim, shape), us in by_prim.most_common(top):
    say(f"    {ms(us):6.2f} ms  {phase} {prim} {shape}")
  say(f"  top {top} ops:")
  for name, us in total.most_common(top):
    text = lines[name]
    op = re.search(r'op_name="([^"]+)"', text)
    say(f"    {ms(us):6.3f} ms  {name[:30]:30s} {text.split(' ')[0][:34]:34s} "
        f"{op.group(1)[-60:] if op else ''}")
  return state


def compare_old(args, cfg, run, inputs, states, contenders):
  """Adds the ``--old`` model's step to ``contenders`` (same parameters, batches)."""
  old = setup(cfg, load_model_class(args.old), dataset=run.dataset)
  if jax.tree.structure(old.state.params) != jax.tree.structure(run.state.params):
    raise SystemExit(f"{args.old}: the parameters' pytree differs")
  same = all(bool(jnp.array_equal(a, b)) for a, b in
             zip(jax.tree.leaves(old.state.params), jax.tree.leaves(run.state.params)))
  say(f"old model {args.old}: same parameter pytree, same initial values: {same}")
  c = cost(old.step_fn.lower(run.state, *inputs[0]).compile())
  say(f"  old step: {c['flops'] / 1e6:.0f} MFLOP, {c['bytes accessed'] / 1e6:.0f} MB "
      f"accessed, {c['transcendentals'] / 1e6:.2f} M transcendentals")
  *_, states["old"] = time_steps(old.step_fn, copy_tree(run.state), inputs, 3)
  contenders["old"] = old.step_fn
  return c


def main(argv=None) -> int:
  p = parser(__doc__, "profile_step")
  p.add_argument("--steps", type=int, default=None, help="timed steps per rep (20)")
  p.add_argument("--reps", type=int, default=None, help="(5)")
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--no-trace", action="store_true")
  p.add_argument("--no-parts", action="store_true")
  p.add_argument("--old", default="", help="another model.py to time against")
  p.add_argument("--model", default="", help="profile this model.py instead")
  args = p.parse_args(argv)
  args.steps = args.steps or (2 if args.quick else 20)
  args.reps = args.reps or (1 if args.quick else 5)
  REPORT.clear()

  cfg = config()
  run = setup(cfg, load_model_class(args.model) if args.model else None)
  inputs = device_inputs(run, range(16), jax.random.key(0))
  params = sum(x.size for x in jax.tree.leaves(run.state.params))
  say(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
      f"params {params:,}")

  t0 = time.perf_counter()
  c = cost(run.step_fn.lower(run.state, *inputs[0]).compile())
  record = {"params": params, "steps": args.steps, "reps": args.reps, "cost": c,
            "compile_s": time.perf_counter() - t0}
  say(f"compile {record['compile_s']:.1f} s; XLA cost analysis of the step: "
      f"{c['flops'] / 1e6:.0f} MFLOP, {c['bytes accessed'] / 1e6:.0f} MB accessed, "
      f"{c['transcendentals'] / 1e6:.2f} M transcendentals")

  *_, state = time_steps(run.step_fn, copy_tree(run.state), inputs, 3)
  contenders, states = {"new": run.step_fn}, {"new": state}
  if args.old:
    record["old_cost"] = compare_old(args, cfg, run, inputs, states, contenders)

  def job(name):
    def rep():
      w, c_, states[name] = time_steps(contenders[name], states[name], inputs, args.steps)
      return w, c_
    return rep

  reps = alternate({name: job(name) for name in contenders}, args.reps)
  wall = {name: [w for w, _ in r] for name, r in reps.items()}
  cpu = {name: [c_ for _, c_ in r] for name, r in reps.items()}
  record.update(wall_ms=wall, cpu_ms=cpu)
  label = {"new": os.path.basename(args.model) if args.model else "new", "old": "old"}
  for name in contenders:
    say(f"step ({label[name]}): {statistics.median(wall[name]):.2f} ms wall, "
        f"{statistics.median(cpu[name]):.2f} ms CPU (medians of {args.reps} x {args.steps} "
        f"steps; wall {', '.join(f'{x:.1f}' for x in wall[name])})")
  if args.old:
    for what, t in (("wall", wall), ("CPU", cpu)):
      ratios = [n / o for n, o in zip(t["new"], t["old"])]
      record[f"new_over_old_{what.lower()}"] = statistics.median(ratios)
      say(f"new / old ({what}): {statistics.median(ratios):.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
  state = states["new"]

  if not args.no_parts:
    times, flops = parts(run, *inputs[0][:2], 3 if args.quick else max(args.steps // 2, 5),
                         1 if args.quick else 3)
    record["parts_ms"], record["parts_flops"] = times, flops
    say("\nparts, each jitted alone on one device:")
    for k, v in times.items():
      say(f"  {v:7.2f} ms  {flops[k] / 1e6:7.0f} MFLOP  {k}")

  if not args.no_trace:
    trace_ops(run.step_fn, state, inputs, args.steps, args.top)
  write_results(args.out, "profile_step", record, ["```"] + REPORT + ["```"],
                title="Where the time of the MOSI-shaped training step goes")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
