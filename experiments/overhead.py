"""ModalImmune's overhead against plain training: parameters, peak memory, inference latency.

    python experiments/overhead.py [--repeats 200] [--out DIR]
    python experiments/overhead.py --quick     # smoke run: the synthetic smoke config, 10 calls

The paper reports +4.9 % parameters, +5.8 % peak memory and 14.7 ms inference
for a 10-second clip. Measured here on the MOSI-shaped synthetic data
(``experiments/configs/synthetic.py:mosi_shaped``: 50 aligned steps per
modality, MulT's input widths 300 / 74 / 35, hidden 64 as ``configs/mosi.py``;
a 10-second clip at MOSI's alignment is these 50 steps):

* **Parameters** of the model with and without ModalImmune's two parts that have
  any (property vectors, the reconstruction generator; the controller, the
  collapse regulariser, the curvature mask and BHGD have none), and the
  floats of the whole training state (parameters, optimiser state, method
  state: the curvature mask keeps two numbers per parameter, BHGD its fixed
  batches).
* **Peak memory of a compiled training step**: XLA's memory analysis of the
  compiled program (arguments + outputs + temporaries - aliased), for plain
  training on the backbone, plain on the full model, and ModalImmune's step
  and each of its periodic programs (the curvature refresh, the controller,
  the hyper-step), at the config's batch size.
* **Latency** of a jitted batch-1 forward pass (evaluation mode), the backbone
  against the full model: median over ``--repeats`` calls, each waited for.

Writes ``OUT/overhead.{json,md}`` (``--out`` default
``experiments/results/overhead``).
"""

from __future__ import annotations

import jax
import numpy as np

from harness import get_config, log, parser, time_calls, write_results
from modalimmune_jax import train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.step import shard_batch

PARTS = {"backbone (no ModalImmune part)": {"model.property_vectors": False,
                                             "model.reconstruction": False},
         "+ property vectors": {"model.property_vectors": True, "model.reconstruction": False},
         "+ reconstruction generator": {"model.property_vectors": False,
                                        "model.reconstruction": True},
         "full model (both)": {"model.property_vectors": True, "model.reconstruction": True}}
BACKBONE, FULL = "backbone (no ModalImmune part)", "full model (both)"


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)
                 if jax.numpy.issubdtype(getattr(x, "dtype", np.float32), jax.numpy.inexact)))


def peak_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias",
                                                             "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def latency_ms(run, repeats: int) -> float:
  params = run.state.params
  batch = jax.tree.map(lambda x: x[:1], run.batches(0))
  forward = jax.jit(lambda p, b: run.model.apply(p, b, None, train=False)["outputs"])
  return 1e3 * time_calls(forward, (params, batch), repeats=repeats)


def main(argv=None):
  ap = parser(__doc__, "overhead")
  ap.add_argument("--repeats", type=int, default=200, help="timed forward calls")
  args = ap.parse_args(argv)
  base = (get_config("synthetic", "smoke") if args.quick
          else get_config("synthetic", "mosi_shaped"))
  repeats = 10 if args.quick else args.repeats
  rng = jax.random.key(0)
  params, latency, memory, state_floats = {}, {}, {}, {}
  for name, parts in PARTS.items():
    run = train.setup(with_overrides(base, dict(parts, **{"method.name": "plain"})),
                      num_devices=1)
    params[name] = count(run.state.params)
    if name in (BACKBONE, FULL):
      latency[name] = latency_ms(run, repeats)
      batch = shard_batch(run.batches(0), run.mesh)
      memory[f"plain step, {name}"] = peak_bytes(run.step_fn.lower(run.state, batch,
                                                                   rng).compile())
      state_floats[f"plain, {name}"] = count((run.state.params, run.state.opt_state,
                                              run.state.method_state))
    log(f"{name}: {params[name]} parameters")
  run = train.setup(with_overrides(base, {"method.name": "modalimmune"}), num_devices=1)
  batch = shard_batch(run.batches(0), run.mesh)
  memory["modalimmune step, full model"] = peak_bytes(
      run.step_fn.lower(run.state, batch, rng).compile())
  for p, fn in run.step_fn.periodic:
    memory[f"modalimmune {p.fn.__name__} (periodic), full model"] = peak_bytes(
        fn.lower(run.state, batch, rng).compile())
  state_floats["modalimmune, full model"] = count((run.state.params, run.state.opt_state,
                                                   run.state.method_state))
  log("memory analysed")

  b, f = params[BACKBONE], params[FULL]
  mib = lambda x: x / 2 ** 20
  plain_peak = memory[f"plain step, {BACKBONE}"]["peak"]
  lines = [f"{'Synthetic smoke config' if args.quick else 'MOSI-shaped synthetic data'} "
           f"(shapes {dict(base.data.synthetic.shapes)}, hidden {base.model.hidden}, "
           f"batch {base.train.batch_size}); one CPU device.", "",
           "**Parameters**", "", "| model | parameters | vs backbone |", "|---|---:|---:|"]
  for name, n in params.items():
    lines.append(f"| {name} | {n:,} | {100 * (n / b - 1):+.1f} % |")
  lines += ["", "**Training state** (floats of parameters + optimiser state + method state)",
            "", "| run | floats | vs plain on the backbone |", "|---|---:|---:|"]
  base_state = state_floats[f"plain, {BACKBONE}"]
  for name, n in state_floats.items():
    lines.append(f"| {name} | {n:,} | {100 * (n / base_state - 1):+.1f} % |")
  lines += ["", "**Peak memory of the compiled program** (XLA memory analysis: arguments + "
            "outputs − aliased + temporaries)", "",
            "| program | arguments MiB | temporaries MiB | peak MiB | vs plain on the backbone |",
            "|---|---:|---:|---:|---:|"]
  for name, m in memory.items():
    lines.append(f"| {name} | {mib(m['argument']):.2f} | {mib(m['temp']):.2f} | "
                 f"{mib(m['peak']):.2f} | {100 * (m['peak'] / plain_peak - 1):+.1f} % |")
  lines += ["", f"**Latency**, jitted batch-1 forward pass (evaluation mode), median of "
            f"{repeats} calls:", "", "| model | ms |", "|---|---:|"]
  for name, ms in latency.items():
    lines.append(f"| {name} | {ms:.3f} |")
  mi_peak = max(m["peak"] for name, m in memory.items() if name.startswith("modalimmune"))
  lines += ["", f"Paper: +4.9 % parameters (here {100 * (f / b - 1):+.1f} %), +5.8 % peak "
            f"memory (here ModalImmune's largest program {100 * (mi_peak / plain_peak - 1):+.1f} % "
            f"over plain's step on the backbone), 14.7 ms for a 10-second clip (here "
            f"{latency[FULL]:.2f} ms on this CPU, batch 1)."]
  print("\n".join(lines))
  write_results(args.out, "overhead", {"parameters": params, "modalimmune_peak_bytes": mi_peak, "state_floats": state_floats,
                                       "memory_bytes": memory, "latency_ms": latency,
                                       "repeats": repeats, "quick": args.quick}, lines,
                title="ModalImmune's overhead against plain training")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
