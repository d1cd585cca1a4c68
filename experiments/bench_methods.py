"""What ModalImmune's parts cost in training, and Neumann against CG on the training model.

    python experiments/bench_methods.py [--data mfeat|synthetic] [--steps 200] [--repeats 3]
        [--train-steps 200] [--threads 0] [--out DIR]
    python experiments/bench_methods.py --quick      # smoke run: smoke config, W=5, K=5, R=1

Measured in one run, on the config's model and data (``experiments/configs/mfeat.py``
by default: 6 views, batch 64; ``--data synthetic``: ``configs/synthetic.py``),
float32, the data-parallel step of :func:`modalimmune_jax.train.setup` on all
local devices, Adam (the config's optimiser):

1. Step cost, periodic parts amortised at their default periods. For each of
   plain; ModalImmune with everything on; and ModalImmune without BHGD /
   without the curvature mask / without the controller / without the
   interventions and the collapse penalty; and with a BHGD that never fires
   (``hyper_every`` 1e9: BHGD's per-step cost without its hyper-steps): the
   first step's wall time (tracing + compilation + one step) and an untimed
   second step, then ``W`` (``--steps``) warm steps timed with
   the ``W`` batches and keys already on the device (no host input pipeline),
   ``block_until_ready`` at the end. The ``W``-step loop is repeated ``R``
   (``--repeats``) times round-robin over the configs (the order rotated each
   round) and the median is reported, since the machine may be shared. The
   default ``W = 200`` holds 4 hyper-steps (``hyper_every=50``) and 20
   controller and curvature-mask refreshes (``ctrl_every = mask_every = 10``);
   the counts in each window are printed. From the medians: the share of the
   ModalImmune step spent in BHGD (all on - BHGD off, over all on; split
   into the hyper-steps, all on - never fires, and the rest), in the
   curvature mask (its HVP refreshes and the destructive split of the
   backward pass), in the controller, and in interventions + collapse penalty.
2. Hyper-gradient products. The model after ``K`` (``--train-steps``) plain
   training steps (the same plain setup, the training loop's batches and
   keys), ModalImmune's own inner (damped Gauss-Newton) and outer objectives,
   initial meta-parameters and (uniform) intensities and fixed BHGD batches
   (taken from the method the all-on config builds), and
   :func:`modalimmune_jax.hypergrad.neumann_hypergrad` with
   ``solver="neumann"`` (``alpha=None``: estimated by power iteration, whose
   products are counted) and ``solver="cg"`` at the same ``tol`` and damping
   (``--dampings``, default 0.1 and 1.0). ``tol`` is relative
   (``--tols``) to the norm of a reference hyper-gradient: CG at a tolerance
   100x below the smallest one (scale from a 50-step CG pilot). Per solve:
   products, terms, the certified error bound, whether certified, the actual
   distance to the reference, and the median wall time of the jitted call
   after compilation (``tol``, ``damping`` and ``max_terms`` are traced, so one
   compilation per solver). Also the training's own setting: a fixed number
   of terms, ``hyper_terms`` (20), and whether its bound would pass
   ``hyper_rel_tol``; and the cost outside the solve (a 0-step CG call).
   ``--quick`` also lowers ``max_terms`` to 200 and times each call once.

``--quick``: the config's ``smoke`` variant (a small model, every periodic part
of ModalImmune within a few steps), ``W = K = 5``, ``R = 1``, one damping and
one tolerance: a couple of minutes, for checking that the script runs.

Step 1 compiles 7 training steps (about a minute each for ModalImmune on a
2-core CPU).

Prints markdown tables and writes them with provenance to
``OUT/bench_methods[_DATA].{json,md}`` (``--out``, default
``experiments/results/bench_methods``). ``--threads N`` pins the process to N CPUs (XLA's
thread pool follows the affinity); 0 leaves the affinity alone.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from harness import (alternate, copy_tree, device_inputs, get_config, host_steps, log,
                     parser, timed_steps, write_results)
from modalimmune_jax import methods, train
from modalimmune_jax.hypergrad import POWER_ITERATIONS, neumann_hypergrad
from modalimmune_jax.methods import modalimmune
from modalimmune_jax.step import host_copy

IDLE_EVERY = 10 ** 9  # a hyper_every no run reaches: BHGD carried, never taken
# (label, method name, config.method.modalimmune overrides)
VARIANTS = (
    ("plain", "plain", {}),
    ("modalimmune, all on", "modalimmune", {}),
    ("  without BHGD", "modalimmune", {"bhgd": False}),
    ("  BHGD that never fires", "modalimmune", {"hyper_every": IDLE_EVERY}),
    ("  without curvature mask", "modalimmune", {"curvature_mask": False}),
    ("  without controller", "modalimmune", {"controller": False}),
    ("  without interventions & collapse", "modalimmune",
     {"interventions": False, "collapse": False}),
)
ALL_ON = VARIANTS[1][0]
LAST_METRICS = ("nonfinite", "hyper/applied", "hyper/rejected", "hyper/num_terms",
                "hyper/error_bound", "hyper/grad_norm")


def variant_config(args, method, overrides):
  return get_config(args.data, args.variant, overrides={
      "method.name": method, **{f"method.modalimmune.{k}": v for k, v in overrides.items()}})


def window_events(first_step, num_steps, mi):
  """Periodic events among the steps ``first_step ..`` (``state.step`` values)."""
  steps = np.arange(first_step, first_step + num_steps)
  return {"hyper": int(np.sum((steps + 1) % mi.hyper_every == 0)),
          "controller": int(np.sum(steps % mi.ctrl_every == 0)),
          "mask": int(np.sum(steps % mi.mask_every == 0))}


# ------------------------------------------------------------ step costs ----

def bench_steps(args, dataset):
  runs, states, first, last_metrics, fresh_plain = {}, {}, {}, {}, None
  base_rng = jax.random.key(0)
  for label, method, overrides in VARIANTS:
    config = variant_config(args, method, overrides)
    log(f"setup {label.strip()}")
    run = train.setup(config, dataset=dataset)
    runs[label] = (config, run)
    if method == "plain":
      fresh_plain = copy_tree(run.state)  # the step donates its state
    # compile, then one untimed step (a retrace would show here)
    states[label], _, first[label] = host_steps(run, run.state, base_rng, range(2), timed=True)
    log(f"  first step {first[label][0]:.2f} s, second {first[label][1] * 1e3:.1f} ms")

  log(f"placing {args.steps} batches on the device")
  inputs = device_inputs(runs[ALL_ON][1], range(2, args.steps + 2), base_rng)

  def job(label):
    def run_window():
      timed = timed_steps(runs[label][1].step_fn, states[label], inputs)
      states[label], last_metrics[label] = timed.state, timed.metrics
      log(f"{label.strip()}: {timed.seconds / args.steps * 1e3:.2f} ms/step")
      return timed.seconds / args.steps
    return run_window

  times = alternate({label: job(label) for label, _, _ in VARIANTS}, args.repeats)
  mi = runs[ALL_ON][0].method.modalimmune
  events = [window_events(2 + r * args.steps, args.steps, mi) for r in range(args.repeats)]
  plain_ms = statistics.median(times["plain"]) * 1e3
  rows = []
  for label, method, overrides in VARIANTS:
    ms = [t * 1e3 for t in times[label]]
    m = {k: float(v) for k, v in host_copy(last_metrics[label]).items() if k in LAST_METRICS}
    rows.append({"config": label.strip(), "method": method, "overrides": overrides,
                 "first_step_s": first[label][0], "second_step_s": first[label][1],
                 "ms_per_step": statistics.median(ms),
                 "ms_per_round": ms, "ratio_to_plain": statistics.median(ms) / plain_ms,
                 "last_metrics": m})
  by = {r["config"]: r["ms_per_step"] for r in rows}
  all_on = by[ALL_ON]
  share = lambda off: (all_on - by[off]) / all_on
  shares = {
      "bhgd": share("without BHGD"),
      "bhgd_hyper_steps": share("BHGD that never fires"),
      "bhgd_standing": (by["BHGD that never fires"] - by["without BHGD"]) / all_on,
      "curvature_mask": share("without curvature mask"),
      "controller": share("without controller"),
      "interventions_collapse": share("without interventions & collapse"),
      "overhead_over_plain": (all_on - by["plain"]) / all_on,
  }
  named = ("bhgd", "curvature_mask", "controller", "interventions_collapse")
  shares["unattributed"] = shares["overhead_over_plain"] - sum(shares[k] for k in named)
  return {"rows": rows, "shares": shares, "events_per_round": events,
          "periods": {"hyper_every": mi.hyper_every, "ctrl_every": mi.ctrl_every,
                      "mask_every": mi.mask_every}}, runs["plain"], fresh_plain, runs[ALL_ON]


# ---------------------------------------------------- hyper-gradient solves ----

def train_plain(plain, state, num_steps):
  """``num_steps`` plain steps from ``state``, as the training loop takes them."""
  config, run = plain
  state, metrics, _ = host_steps(run, state, jax.random.key(config.seed), range(num_steps))
  return state, {k: float(v) for k, v in host_copy(metrics).items()}


def bench_hyper(args, plain, fresh_plain, all_on):
  config, run = all_on
  mi = config.method.modalimmune
  log(f"training plain for {args.train_steps} steps")
  state, metrics = train_plain(plain, fresh_plain, args.train_steps)
  params = state.params
  inner, outer = modalimmune.bhgd_objectives(run.model, methods.settings(config, "modalimmune"))
  ms = run.method.init(params)  # phi0, uniform intensities, the fixed BHGD batches
  phi, alpha = ms.phi, ms.controller.alpha
  train_b, val = ms.hyper_data

  def make(solver):
    @jax.jit
    def solve(params, phi, train_b, alpha, val, tol, damping, max_terms):
      return neumann_hypergrad(inner, outer, params, phi, inner_args=(train_b, alpha),
                               outer_args=(val,), solver=solver, damping=damping,
                               tol=tol, max_terms=max_terms)
    return solve

  fns = {s: make(s) for s in ("neumann", "cg")}
  compile_s = {}

  def call(solver, tol, damping, max_terms, repeats):
    args_ = (params, phi, train_b, alpha, val, jnp.float32(tol), jnp.float32(damping),
             jnp.int32(max_terms))
    if solver not in compile_s:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[solver](*args_))
      compile_s[solver] = time.perf_counter() - t0
      log(f"  compiled {solver} ({compile_s[solver]:.1f} s, including one call)")
    walls = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      g, cert = jax.block_until_ready(fns[solver](*args_))
      walls.append(time.perf_counter() - t0)
    return g, jax.tree.map(lambda x: x.item(), cert._asdict()), statistics.median(walls)

  def dist(a, b):
    return float(otu.tree_norm(otu.tree_sub(a, b)))

  rows, refs = [], {}
  for damping in args.dampings:
    log(f"damping {damping}: pilot and reference (CG)")
    g_pilot, _, _ = call("cg", 0.0, damping, 50, 1)
    pilot = float(otu.tree_norm(g_pilot))
    g_ref, ref_cert, _ = call("cg", 1e-2 * min(args.tols) * pilot, damping, args.max_terms, 1)
    ref_norm = float(otu.tree_norm(g_ref))
    # the cost outside the solve (outer gradient, linearisation, mixed term) plus
    # one product (CG's final residual)
    _, _, overhead = call("cg", 0.0, damping, 0, args.hyper_repeats)
    refs[damping] = {"norm": ref_norm, "pilot_norm": pilot, "overhead_s": overhead,
                     **ref_cert}
    cases = [(f"{rel:g}", rel * ref_norm, args.max_terms) for rel in args.tols]
    # the training's own solve: a fixed number of terms (tol 0 never stops early)
    cases.append((f"K={mi.hyper_terms} fixed", 0.0, mi.hyper_terms))
    for name, tol, max_terms in cases:
      for solver in ("neumann", "cg"):
        log(f"damping {damping}, tol {name}, {solver}")
        g, cert, wall = call(solver, tol, damping, max_terms, args.hyper_repeats)
        fixed = tol == 0.0
        certified = bool(cert["certified"]) if not fixed else bool(
            cert["rigorous"] and not cert["diverging"] and math.isfinite(cert["error_bound"]))
        rows.append({
            "damping": damping, "rel_tol": name, "tol": tol, "solver": solver,
            "max_terms": max_terms, "num_products": int(cert["num_products"]),
            "num_terms": int(cert["num_terms"]), "error_bound": cert["error_bound"],
            "rel_error_bound": cert["error_bound"] / ref_norm, "certified": certified,
            "diverging": bool(cert["diverging"]), "actual_error": dist(g, g_ref),
            "alpha": cert["alpha"], "mixed_norm": cert["mixed_norm"],
            "hypergrad_norm": float(otu.tree_norm(g)), "wall_s": wall,
            "passes_hyper_rel_tol": cert["error_bound"] <= mi.hyper_rel_tol
            * float(otu.tree_norm(g)),
        })
  leaves = jax.tree.leaves(params)
  return {"rows": rows, "references": refs, "compile_s": compile_s,
          "params": int(sum(x.size for x in leaves)), "dtype": str(leaves[0].dtype),
          "train_steps": args.train_steps, "plain_metrics_at_K": metrics,
          "max_terms": args.max_terms, "settings": {
              "hyper_solver": mi.hyper_solver, "hyper_terms": mi.hyper_terms,
              "hyper_damping": mi.hyper_damping, "hyper_rel_tol": mi.hyper_rel_tol,
              "hyper_batch_size": mi.hyper_batch_size}}


# ---------------------------------------------------------------- report ----

def render(record):
  s, h, info = record["steps"], record["hyper"], record["setup"]
  out = [f"Method costs on {info['data']} ({info['platform']}, {info['cpus']} CPUs in the "
         f"affinity, {info['devices']} device(s), batch {info['batch_size']}, "
         f"{info['params']:,} params, float32)", ""]
  p = s["periods"]
  ev = s["events_per_round"]
  differ = "" if all(e == ev[0] for e in ev) else f" (later rounds: {ev[1:]})"
  out += [f"### Step cost: {info['steps']} warm steps x {info['repeats']} round(s), median",
          "",
          f"Periods: hyper_every {p['hyper_every']}, ctrl_every {p['ctrl_every']}, "
          f"mask_every {p['mask_every']}; events per timed window (round 1): "
          f"{ev[0]['hyper']} hyper-steps, {ev[0]['controller']} controller and "
          f"{ev[0]['mask']} mask refreshes{differ}. The BHGD that never fires has "
          f"hyper_every {IDLE_EVERY:.0e}.", "",
          "| config | first step (s) | second step (ms) | ms/step | range over rounds "
          "| x plain |",
          "|---|---:|---:|---:|---:|---:|"]
  for r in s["rows"]:
    lo, hi = min(r["ms_per_round"]), max(r["ms_per_round"])
    out.append(f"| {r['config']} | {r['first_step_s']:.1f} | {r['second_step_s'] * 1e3:.1f} | "
               f"{r['ms_per_step']:.2f} | {lo:.2f}-{hi:.2f} | {r['ratio_to_plain']:.2f} |")
  sh = s["shares"]
  out += ["", "| share of the all-on ModalImmune step | % |", "|---|---:|",
          f"| BHGD (all on - without BHGD) | {100 * sh['bhgd']:.1f} |",
          f"| of which the hyper-steps (all on - never fires) | "
          f"{100 * sh['bhgd_hyper_steps']:.1f} |",
          f"| of which every step (never fires - without BHGD) | "
          f"{100 * sh['bhgd_standing']:.1f} |",
          f"| curvature mask: HVP refreshes + destructive split | "
          f"{100 * sh['curvature_mask']:.1f} |",
          f"| controller | {100 * sh['controller']:.1f} |",
          f"| interventions + collapse penalty | {100 * sh['interventions_collapse']:.1f} |",
          f"| unattributed (interactions, noise) | {100 * sh['unattributed']:.1f} |",
          f"| everything over plain | {100 * sh['overhead_over_plain']:.1f} |", ""]
  bh = next(r for r in s["rows"] if r["config"] == ALL_ON)["last_metrics"]
  if "hyper/applied" in bh and bh["hyper/applied"] + bh["hyper/rejected"] == 0:
    out += ["All-on run: no hyper-step taken yet.", ""]
  elif "hyper/applied" in bh:
    out.append(f"All-on run: {bh['hyper/applied']:.0f} hyper-steps applied, "
               f"{bh['hyper/rejected']:.0f} rejected; the last used {bh['hyper/num_terms']:.0f} "
               f"CG terms, error bound {bh['hyper/error_bound']:.3g} for "
               f"|g| {bh['hyper/grad_norm']:.3g}.")
    out.append("")

  st = h["settings"]
  out += [f"### Hyper-gradient solves after {h['train_steps']} plain steps",
          "",
          f"ModalImmune's inner (damped Gauss-Newton) and outer objectives on its fixed "
          f"batches ({st['hyper_batch_size']} samples), max_terms {h['max_terms']}; "
          f"Neumann with alpha=None (its {POWER_ITERATIONS} power-iteration products are "
          f"counted). "
          f"Tolerances are relative to the reference |g| (CG, below). The training uses "
          f"{st['hyper_solver']} with {st['hyper_terms']} terms at damping "
          f"{st['hyper_damping']} and applies a step when bound <= "
          f"{st['hyper_rel_tol']} |g|.", ""]
  for damping, ref in h["references"].items():
    stop = ("CG breakdown" if ref["diverging"] else "max_terms"
            if ref["num_terms"] >= h["max_terms"] else "its recursive residual met tol")
    out.append(f"- damping {damping}: reference |g| {ref['norm']:.4g} (CG, "
               f"{ref['num_products']} products, stopped by {stop}, bound "
               f"{ref['error_bound'] / ref['norm']:.2e} relative); mixed-term norm "
               f"{ref['mixed_norm']:.3g}; cost outside the solve (+ 1 product) "
               f"{ref['overhead_s'] * 1e3:.1f} ms")
  out += ["", "Actual err: distance to the reference. ms/product: (ms/call - cost outside "
          "the solve) / (products - 1). Passes: bound <= hyper_rel_tol |g| (the training's "
          "acceptance test).",
          "", "| damping | tol (rel) | solver | products | terms | error bound (rel) | "
          "certified | passes | actual err (rel) | ms/call | ms/product |",
          "|---:|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
  for r in h["rows"]:
    ref = h["references"][r["damping"]]
    flag = "yes" if r["certified"] else ("diverged" if r["diverging"] else "no")
    per = (r["wall_s"] - ref["overhead_s"]) / max(r["num_products"] - 1, 1)
    out.append(f"| {r['damping']:g} | {r['rel_tol']} | {r['solver']} | {r['num_products']} | "
               f"{r['num_terms']} | {r['rel_error_bound']:.2e} | {flag} | "
               f"{'yes' if r['passes_hyper_rel_tol'] else 'no'} | "
               f"{r['actual_error'] / ref['norm']:.2e} | {r['wall_s'] * 1e3:.1f} | "
               f"{per * 1e3:.2f} |")
  out += ["", "Ratios marked > : Neumann stopped at max_terms without reaching the "
          "tolerance; * : CG not certified at it.", "",
          "| damping | tol (rel) | Neumann / CG products | Neumann / CG time |",
          "|---:|---|---:|---:|"]
  pairs = {}
  for r in h["rows"]:
    pairs.setdefault((r["damping"], r["rel_tol"]), {})[r["solver"]] = r
  for (damping, rel), pr in pairs.items():
    n, c = pr["neumann"], pr["cg"]
    fixed = n["tol"] == 0.0
    mark = "" if fixed or n["certified"] else "> "
    star = "" if fixed or c["certified"] else " *"
    out.append(f"| {damping:g} | {rel} | {mark}{n['num_products'] / c['num_products']:.1f}"
               f"{star} | {mark}{n['wall_s'] / c['wall_s']:.1f}{star} |")
  out += ["", "Compile (first call) s: " + ", ".join(
      f"{k} {v:.1f}" for k, v in h["compile_s"].items())]
  return "\n".join(out) + "\n"


def parse_args(argv=None):
  p = parser(__doc__, "bench_methods")
  p.add_argument("--data", default="mfeat", choices=("mfeat", "synthetic"))
  p.add_argument("--steps", type=int, default=None, help="W timed steps per round (200)")
  p.add_argument("--repeats", type=int, default=None, help="R rounds (3)")
  p.add_argument("--train-steps", type=int, default=None,
                 help="K plain steps before the hyper-gradient solves (200)")
  p.add_argument("--tols", type=float, nargs="+", default=None,
                 help="tolerances relative to the reference |hypergrad| (1e-2 1e-3 1e-4)")
  p.add_argument("--dampings", type=float, nargs="+", default=None, help="(0.1 1.0)")
  p.add_argument("--max-terms", type=int, default=None, help="(2000; --quick 200)")
  p.add_argument("--hyper-repeats", type=int, default=None,
                 help="timed calls per solve, median (3; --quick 1)")
  p.add_argument("--threads", type=int, default=0,
                 help="pin the process to this many CPUs (0: leave as is)")
  args = p.parse_args(argv)
  quick = args.quick
  pick = lambda value, full, small: value if value is not None else (small if quick else full)
  args.steps = pick(args.steps, 200, 5)
  args.repeats = pick(args.repeats, 3, 1)
  args.train_steps = pick(args.train_steps, 200, 5)
  args.tols = pick(args.tols, [1e-2, 1e-3, 1e-4], [1e-2])
  args.dampings = pick(args.dampings, [0.1, 1.0], [0.1])
  args.max_terms = pick(args.max_terms, 2000, 200)
  args.hyper_repeats = pick(args.hyper_repeats, 3, 1)
  args.variant = "smoke" if quick else ""
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.threads:
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cpus)  # before the XLA backend starts its thread pool
  log(f"{jax.devices()[0].platform}, {len(jax.devices())} device(s), "
      f"{len(os.sched_getaffinity(0))} CPUs; W={args.steps} R={args.repeats} "
      f"K={args.train_steps}")
  dataset = train.load_data(get_config(args.data, args.variant))
  steps, plain, fresh_plain, all_on = bench_steps(args, dataset)
  hyper = bench_hyper(args, plain, fresh_plain, all_on)
  record = {
      "setup": {"data": dataset.name, "platform": jax.devices()[0].platform,
                "devices": plain[1].mesh.devices.size, "cpus": len(os.sched_getaffinity(0)),
                "batch_size": all_on[0].train.batch_size, "params": hyper["params"],
                "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
                "dtype": hyper["dtype"],
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "compilation_cache": jax.config.jax_compilation_cache_dir},
      "steps": steps, "hyper": hyper,
  }
  text = render(record)
  print("\n" + text)
  name = "bench_methods" + ("" if args.data == "mfeat" else f"_{args.data}")
  write_results(args.out, name, record, text.splitlines(),
                title=f"bench_methods ({dataset.name})", seed=0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
