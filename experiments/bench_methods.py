"""What ModalImmune's parts cost in training, on mfeat and MOSI-shaped data, in one run.

    python experiments/bench_methods.py [--steps W] [--repeats 5] [--workloads mfeat MOSI-shaped]
        [--first-step-rounds 3] [--solvers] [--threads 0] [--out DIR]
    python experiments/bench_methods.py --quick      # smoke run: smoke configs, R=1

Workloads (``harness.bench_workloads``): ``configs/mfeat.py`` (6 views, batch
64; ModalImmune's periods: controller 10, mask 10, hyper-step 50) and
MOSI-shaped synthetic data (``configs/synthetic.py:mosi_shaped``: 3 sequence
modalities of 50 frames, widths 300/74/35, regression, batch 32) with
ModalImmune's settings as a user of ``configs/mosi.py`` gets them (hyper-step
every 250, hyper-batch 32; the output names the overrides). float32, the
data-parallel step of :func:`modalimmune_jax.train.setup`, the config's
optimiser. Per workload:

1a. Step cost. plain; ModalImmune with everything on; with a BHGD that never
    fires (``hyper_every`` 1e9: its per-step cost without hyper-steps); without
    BHGD / without the curvature mask / without the controller / without the
    interventions and the collapse penalty. Each is compiled and stepped twice
    (steps 0 and 1; each periodic program is then called once more, on a copy,
    so that no timed window compiles one), then timed in windows of ``W`` warm
    steps (``step_fn(state, batch, key, step)`` with the batches and keys
    already on the device, ``block_until_ready`` at the end). ``W`` is the
    smallest multiple of ModalImmune's periods of at least 100 steps
    (``harness.amortising_window``: mfeat 100 steps with 2 hyper-steps and 10
    controller and mask refreshes; MOSI's periods 250 steps with 1 hyper-step
    and 25 of each), so a window holds each periodic part exactly as often as
    training does. ``R`` (``--repeats``) rounds, the configs alternated (the
    order rotated each round); medians. Also timed in the same rounds: the bare
    train step (``step_fn.train_step``) of the all-on config and of the one
    without BHGD.
1b. The amortised share of each part, measured directly: the bare train step
    and each periodic program per call (the curvature refresh ``refresh``, the
    controller ``measure``, the hyper-step ``bhgd``; ``fn(state, batch, key)``
    calls each on its own copy of the all-on state after the windows,
    alternated over ``R`` rounds, median), so that the amortised step is
    ``train step + sum(program / every)``, with each part's exact share; the
    all-on window beside it is the check. A BHGD that never fires: the bare
    train step with BHGD (its fixed batches carried) against without, and the
    windows of the two configs.
    The same parts in FLOPs: XLA's cost analysis of each compiled program
    (``harness.gflops``; plain's step, the all-on train step and the one
    without the curvature mask, i.e. without the destructive split it brings,
    and each periodic program per call), amortised as above: the ratio to
    plain that the arithmetic alone sets, against which the timed ratio reads.
1c. First step, cold and warm, of plain and ModalImmune all on: a fresh
    process per measurement (``--first-step WORKLOAD:METHOD``, this script)
    with ``JAX_COMPILATION_CACHE_DIR`` a new empty directory (cold), then a
    second process with the same directory (warm: the persistent cache that the
    cold process filled; ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0``). It
    reports the wall time of the first ``step_fn`` call (the train step and the
    periodic programs that fire at step 0: the curvature refresh and the
    controller; the programs are wrapped to wait for each one, which also
    times each call), then the first call of the programs that fire later (the
    hyper-step), and a second call of each: a program's compile time is its
    first call minus its second. ``--first-step-rounds`` rounds (3), each with
    a new cache; per method and cache the median process. Ratios to plain: of
    the medians, and each round's own.
2.  ``--solvers`` (off by default: it adds about 10 minutes per workload):
    hyper-gradient solves. The model after ``K`` (``--train-steps``) plain
    training steps, ModalImmune's own inner (damped Gauss-Newton) and outer
    objectives, initial meta-parameters, uniform intensities and fixed BHGD
    batches, and :func:`modalimmune_jax.hypergrad.neumann_hypergrad` with
    ``solver="neumann"`` (``alpha=None``: estimated by power iteration, whose
    products are counted) and ``solver="cg"`` at the same ``tol`` and damping
    (``--dampings``). ``tol`` is relative (``--tols``) to the norm of a
    reference hyper-gradient: CG at a tolerance 100x below the smallest one.
    Per solve: products, terms, the certified error bound, whether certified,
    the distance to the reference, the median wall time of the jitted call.
    Also the training's own settings: ``hyper_tol`` relative to the iterate's
    own hyper-gradient with ``hyper_terms`` as the cap, and the fixed
    ``hyper_terms`` that runs without ``hyper_tol`` took.

``--quick``: each workload's ``smoke`` sizes and periods (every periodic part
within 4 steps), ``W = 4``, ``R = 1``, one call per program, and with
``--solvers`` ``K = 5``, one damping, one tolerance: a few minutes, for
checking that the script runs (XLA's optimisations off: the timings mean
nothing).

The full run compiles 7 configs per workload in this process and 4 first
steps per workload in others: about 25 minutes on a 2-core CPU without
``--solvers``. Prints markdown tables and writes them with provenance to
``OUT/bench_methods.{json,md}`` (``--out``, default
``experiments/results/bench_methods``). ``--threads N`` pins the process (and
its subprocesses) to N CPUs; 0 leaves the affinity alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from harness import (alternate, amortising_window, bench_workloads, compile_periodic,
                     copy_tree, device_inputs, gflops, host_steps, log, no_gc, parser,
                     step_gflops, time_windows, window_inputs, workload_flags, write_results)
from modalimmune_jax import methods, train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.hypergrad import POWER_ITERATIONS, neumann_hypergrad
from modalimmune_jax.methods import modalimmune
from modalimmune_jax.step import StepFn, host_copy

IDLE_EVERY = 10 ** 9  # a hyper_every no run reaches: BHGD carried, never taken
# (label, method name, config.method.modalimmune overrides)
VARIANTS = (
    ("plain", "plain", {}),
    ("modalimmune, all on", "modalimmune", {}),
    ("BHGD that never fires", "modalimmune", {"hyper_every": IDLE_EVERY}),
    ("without BHGD", "modalimmune", {"bhgd": False}),
    ("without curvature mask", "modalimmune", {"curvature_mask": False}),
    ("without controller", "modalimmune", {"controller": False}),
    ("without interventions & collapse", "modalimmune",
     {"interventions": False, "collapse": False}),
)
ALL_ON, IDLE, NO_BHGD = "modalimmune, all on", "BHGD that never fires", "without BHGD"
BARE = {"train step alone, all on": ALL_ON, "train step alone, without BHGD": NO_BHGD}
# what the issue asks of ModalImmune all on, as a multiple of plain's step
TARGET = {"mfeat": 1.5, "MOSI-shaped": 1.3}
IDLE_TARGET = 0.02  # a BHGD that never fires: under 2 % of a step
FIRST_STEP_TARGET = 3.0  # ModalImmune's first step within 3x plain's
# each periodic program: its period's key, what it is, the variant without it
PROGRAMS = {"refresh": ("mask_every", "curvature mask refresh (before the step)",
                        "without curvature mask"),
            "measure": ("ctrl_every", "controller (after the step)", "without controller"),
            "bhgd": ("hyper_every", "hyper-step (after the step)", IDLE)}
LAST_METRICS = ("nonfinite", "hyper/applied", "hyper/rejected", "hyper/num_terms",
                "hyper/error_bound", "hyper/grad_norm")


def variant_config(workload, method, overrides):
  return with_overrides(workload.config, {
      "method.name": method, **{f"method.modalimmune.{k}": v for k, v in overrides.items()}})


def floats(metrics, keys=LAST_METRICS):
  return {k: float(v) for k, v in host_copy(metrics).items() if k in keys}


def median_ms(seconds):
  return statistics.median(seconds) * 1e3


# ------------------------------------------------------- 1a, 1b: step costs ----

def bare_step(run):
  """``run.step_fn``'s train step alone, in ``step_fn``'s signature."""
  train_step = run.step_fn.train_step
  return lambda state, batch, key, step: train_step(state, batch, key)


def program_job(fn, state, batch, key, calls):
  """A job timing ``calls`` calls of the periodic program ``fn``, each on its own
  copy of ``state`` (the program donates it; every call does the same work):
  ``(seconds per call, the last call's metrics)``."""
  def job():
    copies = jax.block_until_ready([copy_tree(state) for _ in range(calls)])
    with no_gc():
      t0 = time.perf_counter()
      outs = [fn(c, batch, key) for c in copies]
      jax.block_until_ready(outs)
      seconds = time.perf_counter() - t0
    return seconds / calls, outs[-1][1]
  return job


def arithmetic(runs, last, batch, key):
  """The parts in FLOPs (``harness.step_gflops``): plain's step, the all-on
  step and its programs, and the train step without the curvature mask (so
  without the destructive split it brings)."""
  f = {label: step_gflops(runs[label][1], last[label].state, batch, key)
       for label in ("plain", ALL_ON)}
  without = gflops(runs["without curvature mask"][1].step_fn.train_step,
                   last["without curvature mask"].state, batch, key)
  plain, mi = f["plain"]["amortised"], f[ALL_ON]
  return {"train_step_gflop": {"plain": plain, ALL_ON: mi["train_step"],
                               "without curvature mask": without},
          "program_gflop": {n: r["gflop_per_call"] for n, r in mi["programs"].items()},
          "program_every": {n: r["every"] for n, r in mi["programs"].items()},
          "amortised_gflop": mi["amortised"], "ratio_to_plain": mi["amortised"] / plain}


def bench_steps(args, workload, dataset):
  window = args.steps or amortising_window(workload.config, 4 if args.quick else 100)
  rng = jax.random.key(0)
  runs, states, first, inputs = {}, {}, {}, None
  for label, method, overrides in VARIANTS:
    config = variant_config(workload, method, overrides)
    log(f"[{workload.name}] setup {label}")
    run = train.setup(config, dataset=dataset)
    if method == "plain":
      fresh_plain = copy_tree(run.state)  # the step donates its state
    # compile, then one untimed step (a retrace would show here)
    state, _, first[label] = host_steps(run, run.state, rng, range(2), timed=True)
    if inputs is None:
      inputs = window_inputs(run, 2, window, rng)
    compiled = compile_periodic(run, state, *inputs[0][:2], [s for _, _, s in inputs])
    log(f"  first step {first[label][0]:.2f} s, second {first[label][1] * 1e3:.1f} ms"
        + "".join(f"; first {k} {v:.2f} s" for k, v in compiled.items()))
    runs[label], states[label] = (config, run), state

  log(f"[{workload.name}] {args.repeats} round(s) of {window}-step windows")
  jobs = {label: (runs[label][1].step_fn, states[label]) for label, _, _ in VARIANTS}
  jobs.update({bare: (bare_step(runs[v][1]), copy_tree(states[v])) for bare, v in BARE.items()})
  times, last = time_windows(jobs, inputs, args.repeats)

  # 1b: each periodic program per call, on the all-on state after the windows
  all_on = runs[ALL_ON][1]
  batch, key, _ = inputs[0]
  programs = {p.fn.__name__: (p, fn) for p, fn in all_on.step_fn.periodic}
  calls = {name: 1 if args.quick else (3 if name == "bhgd" else 10) for name in programs}
  log(f"[{workload.name}] periodic programs: {calls} calls x {args.repeats} round(s)")
  measured = alternate({name: program_job(fn, last[ALL_ON].state, batch, key, calls[name])
                        for name, (_, fn) in programs.items()}, args.repeats)

  mi = runs[ALL_ON][0].method.modalimmune
  plain_ms = median_ms(times["plain"])
  rows = []
  for label, method, overrides in VARIANTS:
    ms = [t * 1e3 for t in times[label]]
    rows.append({"config": label, "method": method, "overrides": overrides,
                 "ms_per_step": statistics.median(ms), "ms_per_round": ms,
                 "ratio_to_plain": statistics.median(ms) / plain_ms,
                 "in_process_first_step_s": first[label][0],
                 "in_process_second_step_s": first[label][1],
                 "last_metrics": floats(last[label].metrics)})
  by = {r["config"]: r["ms_per_step"] for r in rows}
  bare = {b: median_ms(times[b]) for b in BARE}
  program_rows = {}
  for name, (p, _) in programs.items():
    every_key, what, ablation = PROGRAMS[name]
    ms = [t * 1e3 for t, _ in measured[name]]
    program_rows[name] = {
        "what": what, "every": p.every, "period_key": every_key, "before": p.before,
        "calls_per_round": calls[name], "ms_per_call": statistics.median(ms),
        "ms_per_round": ms, "amortised_ms": statistics.median(ms) / p.every,
        "ablation": ablation, "ablation_ms": by[ALL_ON] - by[ablation],
        "last_metrics": floats(measured[name][-1][1])}
  log(f"[{workload.name}] FLOPs of each program (XLA cost analysis of the compiled programs)")
  flops = arithmetic(runs, last, batch, key)
  train_ms = bare["train step alone, all on"]
  amortised = train_ms + sum(r["amortised_ms"] for r in program_rows.values())
  events = {name: window // p.every for name, (p, _) in programs.items()}
  record = {
      "workload": workload.name, "source": workload.source, "overrides": workload.overrides,
      "data": dataset.name, "batch_size": workload.config.train.batch_size,
      "params": int(sum(x.size for x in jax.tree.leaves(fresh_plain.params))),
      "window": window, "repeats": args.repeats, "window_first_step": inputs[0][2],
      "periods": {"hyper_every": mi.hyper_every, "ctrl_every": mi.ctrl_every,
                  "mask_every": mi.mask_every},
      "events_per_window": events, "rows": rows,
      "bare_train_step_ms": bare,
      "bare_train_step_ms_per_round": {b: [t * 1e3 for t in times[b]] for b in BARE},
      "programs": program_rows,
      "amortised": {
          "plain_ms": plain_ms, "train_step_ms": train_ms,
          "train_step_extra_ms": train_ms - plain_ms,
          "bhgd_carried_ms": train_ms - bare["train step alone, without BHGD"],
          "total_ms": amortised, "ratio_to_plain": amortised / plain_ms,
          "window_ms": by[ALL_ON], "interventions_collapse_ablation_ms":
              by[ALL_ON] - by["without interventions & collapse"]},
      "flops": flops,
      "all_on_ratio": by[ALL_ON] / plain_ms,
      "target_ratio": TARGET.get(workload.name),
      "idle_bhgd": {"window_fraction": (by[IDLE] - by[NO_BHGD]) / by[NO_BHGD],
                    "train_step_fraction": (train_ms - bare["train step alone, without BHGD"])
                    / bare["train step alone, without BHGD"]},
  }
  return record, runs, fresh_plain


# ------------------------------------------------------ 1c: the first step ----

def probe_first_step(args) -> int:
  """The ``--first-step WORKLOAD:METHOD`` mode: one JSON line on stdout with
  this process's setup time, first ``step_fn`` call and each program's first
  and second call (see 1c)."""
  name, method = args.first_step.split(":")
  workload = next(w for w in bench_workloads(args.quick) if w.name == name)
  t0 = time.perf_counter()
  run = train.setup(with_overrides(workload.config, {"method.name": method}))
  setup_s = time.perf_counter() - t0
  batch, key, _ = device_inputs(run, [0], jax.random.key(0))[0]
  calls = {}

  def waited(name, fn):
    def call(*args_):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*args_))
      calls.setdefault(name, []).append(time.perf_counter() - t)
      return out
    return call

  step_fn = StepFn(waited("train_step", run.step_fn.train_step),
                   [(p, waited(p.fn.__name__, fn)) for p, fn in run.step_fn.periodic])
  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(step_fn(run.state, batch, key, 0))
  first_step_s = time.perf_counter() - t0
  at_step_0 = set(calls)
  for p, fn in step_fn.periodic:  # the programs that fire later (the hyper-step)
    if not p.fires(0):
      state, _ = fn(state, batch, key)
  state, _ = step_fn.train_step(state, batch, key)  # second calls: no compilation
  for p, fn in step_fn.periodic:
    state, _ = fn(state, batch, key)
  programs = {n: {"first_call_s": c[0], "second_call_s": c[1], "compile_s": c[0] - c[1],
                  "fires_at_step_0": n in at_step_0} for n, c in calls.items()}
  print(json.dumps({"setup_s": setup_s, "first_step_s": first_step_s, "programs": programs,
                    "compile_s": sum(p["compile_s"] for p in programs.values()),
                    "cache": jax.config.jax_compilation_cache_dir}))
  return 0


def first_steps(args, workload):
  """Cold and warm first steps of plain and ModalImmune (a process each), in
  ``args.first_step_rounds`` rounds (plain cold, plain warm, ModalImmune cold,
  warm; a new cache each round). Per method and cache: the process whose first
  step is the median over the rounds (so its programs' figures are one
  process's); the ratios are of those medians, and each round's own ratios are
  kept (``rounds``) to show the spread."""
  runs = {"plain": {"cold": [], "warm": []}, "modalimmune": {"cold": [], "warm": []}}
  for k in range(args.first_step_rounds):
    for method in ("plain", "modalimmune"):
      cache = tempfile.mkdtemp(prefix="bench-methods-xla-cache-")
      env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
      command = [sys.executable, os.path.abspath(__file__), "--first-step",
                 f"{workload.name}:{method}"] + (["--quick"] if args.quick else [])
      try:
        for attempt in ("cold", "warm"):
          log(f"[{workload.name}] first step, {method}, {attempt} cache (a new process), "
              f"round {k + 1}/{args.first_step_rounds}")
          done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
          r = json.loads(done.stdout.strip().splitlines()[-1])
          r["cache_files"] = sum(len(f) for _, _, f in os.walk(cache))
          runs[method][attempt].append(r)
          log(f"  first step {r['first_step_s']:.2f} s, compile of all programs "
              f"{r['compile_s']:.2f} s")
      finally:
        shutil.rmtree(cache, ignore_errors=True)
  out = {method: {attempt: median_record(rs) for attempt, rs in by.items()}
         for method, by in runs.items()}
  ratios, rounds = {}, []
  for attempt in ("cold", "warm"):
    plain, mi = out["plain"][attempt], out["modalimmune"][attempt]
    ratios[attempt] = {"first_step": mi["first_step_s"] / plain["first_step_s"],
                       "compile": mi["compile_s"] / plain["compile_s"]}
  for k in range(args.first_step_rounds):
    rounds.append({attempt: runs["modalimmune"][attempt][k]["first_step_s"]
                   / runs["plain"][attempt][k]["first_step_s"] for attempt in ("cold", "warm")})
  out.update(ratios=ratios, rounds=rounds, all_runs=runs)
  return out


def median_record(records: list[dict]) -> dict:
  """The record whose first step is the median (the lower middle one of an even count)."""
  ranked = sorted(records, key=lambda r: r["first_step_s"])
  return ranked[(len(ranked) - 1) // 2]


# ------------------------------------------- 2: hyper-gradient solves (--solvers) ----

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

  def make(solver, relative):
    @jax.jit
    def solve(params, phi, train_b, alpha, val, tol, damping, max_terms):
      stop = {"rel_tol" if relative else "tol": tol}
      return neumann_hypergrad(inner, outer, params, phi, inner_args=(train_b, alpha),
                               outer_args=(val,), solver=solver, damping=damping,
                               max_terms=max_terms, **stop)
    return solve

  fns = {(s, rel): make(s, rel) for s in ("neumann", "cg") for rel in (False, True)}
  compile_s = {}

  def call(solver, tol, damping, max_terms, repeats, relative=False):
    args_ = (params, phi, train_b, alpha, val, jnp.float32(tol), jnp.float32(damping),
             jnp.int32(max_terms))
    name = solver + (" (rel_tol)" if relative else "")
    if name not in compile_s:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[solver, relative](*args_))
      compile_s[name] = time.perf_counter() - t0
      log(f"  compiled {name} ({compile_s[name]:.1f} s, including one call)")
    walls = []
    for _ in range(repeats):
      with no_gc():
        t0 = time.perf_counter()
        g, cert = jax.block_until_ready(fns[solver, relative](*args_))
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
    # (name, tol, max_terms, relative to the iterate's own |g|)
    cases = [(f"{rel:g}", rel * ref_norm, args.max_terms, False) for rel in args.tols]
    if mi.hyper_tol:  # the training's own stopping rule, hyper_terms its cap
      cases.append((f"hyper_tol={mi.hyper_tol:g}, cap {mi.hyper_terms}", mi.hyper_tol,
                    mi.hyper_terms, True))
    # a fixed number of terms, as runs without hyper_tol (tol 0 never stops early)
    cases.append((f"K={mi.hyper_terms} fixed", 0.0, mi.hyper_terms, False))
    for name, tol, max_terms, relative in cases:
      for solver in ("neumann", "cg"):
        log(f"damping {damping}, tol {name}, {solver}")
        g, cert, wall = call(solver, tol, damping, max_terms, args.hyper_repeats, relative)
        fixed = tol == 0.0
        certified = bool(cert["certified"]) if not fixed else bool(
            cert["rigorous"] and not cert["diverging"] and math.isfinite(cert["error_bound"]))
        rows.append({
            "damping": damping, "rel_tol": name, "tol": tol, "relative": relative,
            "solver": solver, "max_terms": max_terms,
            "num_products": int(cert["num_products"]),
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
              "hyper_tol": mi.hyper_tol, "hyper_damping": mi.hyper_damping,
              "hyper_rel_tol": mi.hyper_rel_tol, "hyper_batch_size": mi.hyper_batch_size}}


# ---------------------------------------------------------------- report ----

def met(ok):
  return "met" if ok else "**not met**"


def render_summary(record):
  out = ["## Summary", "",
         "| workload | ModalImmune all on / plain | target | amortised parts / plain "
         "| FLOPs / plain (amortised) "
         "| BHGD that never fires (window, % of a step) | (train step alone) "
         "| first step / plain, cold | warm | all programs' compile / plain, cold | warm |",
         "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for w in record["workloads"]:
    target = w["target_ratio"]
    idle = w["idle_bhgd"]
    first = w["first_step"]["ratios"]
    out.append(
        f"| {w['workload']} | {w['all_on_ratio']:.2f} | <= {target} ({met(w['all_on_ratio'] <= target)}) "
        f"| {w['amortised']['ratio_to_plain']:.2f} | {flop_ratio(w)} "
        f"| {100 * idle['window_fraction']:+.1f} ({met(idle['window_fraction'] < IDLE_TARGET)}) "
        f"| {100 * idle['train_step_fraction']:+.1f} "
        f"| {first['cold']['first_step']:.2f} | {first['warm']['first_step']:.2f} "
        f"| {first['cold']['compile']:.2f} | {first['warm']['compile']:.2f} |")
  out += ["", f"Targets (issue 17): all on within the target multiple of plain; a BHGD that "
          f"never fires under {100 * IDLE_TARGET:.0f} % of a step (ModalImmune without BHGD); "
          f"the first step within {FIRST_STEP_TARGET:g}x plain's, cold and warm. A first "
          "step's ratio counts the train step and the programs that fire at step 0; the "
          "compile ratio counts every program, the hyper-step's too (it compiles when it first "
          "fires). FLOPs / plain: the amortised all-on step's arithmetic against plain's step "
          "(XLA's cost analysis, below): the ratio a step at plain's arithmetic speed would "
          "show.", ""]
  return out


def flop_ratio(w):
  return f"{w['flops']['ratio_to_plain']:.2f}" if "flops" in w else "-"


def render_flops(w):
  """The parts in FLOPs (``arithmetic``)."""
  f = w["flops"]
  step, calls, every = f["train_step_gflop"], f["program_gflop"], f["program_every"]
  plain = step["plain"]
  row = lambda part, gf, n: (f"| {part} | {gf:.3f} | {n} | {gf / n:.4f} | "
                             f"{gf / n / plain:.3f} |")
  out = ["### The parts in FLOPs", "",
         "XLA's cost analysis of each compiled program (`harness.gflops`; a while "
         "loop's body is counted once, so the hyper-step's CG solve is undercounted). What "
         "the arithmetic alone makes the step cost, before any time is measured.", "",
         "| part | GFLOP per call | every | amortised GFLOP/step | x plain's step |",
         "|---|---:|---:|---:|---:|",
         row("train step: plain's", plain, 1),
         row("train step: ModalImmune all on", step[ALL_ON], 1),
         row("- of which the destructive split (all on - without curvature mask)",
             step[ALL_ON] - step["without curvature mask"], 1)]
  for name, gf in calls.items():
    out.append(row(f"{PROGRAMS[name][1]} (`{name}`)", gf, every[name]))
  out += [f"| **amortised all-on step** | | | **{f['amortised_gflop']:.4f}** | "
          f"**{f['ratio_to_plain']:.2f}** |", ""]
  return out


def render_workload(w, info):
  p, ev = w["periods"], w["events_per_window"]
  out = [f"## {w['workload']}", "",
         f"{w['source']}: data {w['data']}, batch {w['batch_size']}, {w['params']:,} params, "
         f"float32; {info['platform']}, {info['cpus']} CPUs in the affinity, "
         f"{info['devices']} device(s).", "",
         f"### Step cost: {w['window']}-step warm windows from step "
         f"{w['window_first_step']}, {w['repeats']} round(s), median", "",
         f"Periods: hyper_every {p['hyper_every']}, ctrl_every {p['ctrl_every']}, "
         f"mask_every {p['mask_every']}: each window holds {ev.get('bhgd', 0)} hyper-step(s), "
         f"{ev.get('measure', 0)} controller and {ev.get('refresh', 0)} mask refreshes, as "
         f"training does per {w['window']} steps. The BHGD that never fires has hyper_every "
         f"{IDLE_EVERY:.0e}.", "",
         "| config | ms/step | range over rounds | x plain |", "|---|---:|---:|---:|"]
  for r in w["rows"]:
    lo, hi = min(r["ms_per_round"]), max(r["ms_per_round"])
    out.append(f"| {r['config']} | {r['ms_per_step']:.2f} | {lo:.2f}-{hi:.2f} | "
               f"{r['ratio_to_plain']:.2f} |")
  for b, ms in w["bare_train_step_ms"].items():
    rounds = w["bare_train_step_ms_per_round"][b]
    out.append(f"| {b} (no periodic programs) | {ms:.2f} | {min(rounds):.2f}-{max(rounds):.2f} "
               f"| {ms / w['amortised']['plain_ms']:.2f} |")
  target = w["target_ratio"]
  idle = w["idle_bhgd"]
  out += ["", f"ModalImmune all on: {w['all_on_ratio']:.2f}x plain (target <= {target}x: "
          f"{met(w['all_on_ratio'] <= target)}). A BHGD that never fires: "
          f"{100 * idle['window_fraction']:+.1f} % of a step without BHGD (windows), "
          f"{100 * idle['train_step_fraction']:+.1f} % (the train step alone); target under "
          f"{100 * IDLE_TARGET:.0f} %: {met(idle['window_fraction'] < IDLE_TARGET)}.", ""]
  bh = next(r for r in w["rows"] if r["config"] == ALL_ON)["last_metrics"]
  if bh.get("hyper/applied", 0) + bh.get("hyper/rejected", 0) > 0:
    out += [f"All-on run at the end of its windows: {bh['hyper/applied']:.0f} hyper-steps "
            f"applied, {bh['hyper/rejected']:.0f} rejected; the last used "
            f"{bh['hyper/num_terms']:.0f} CG terms, error bound {bh['hyper/error_bound']:.3g} "
            f"for |g| {bh['hyper/grad_norm']:.3g}.", ""]

  a = w["amortised"]
  total = a["total_ms"]
  share = lambda ms: f"{100 * ms / total:.1f}"
  out += ["### The amortised ModalImmune step, part by part", "",
          "Measured directly: the bare train step (windows as above) and each periodic "
          "program per call (each call on its own copy of the all-on state after the "
          "windows; median over rounds); amortised = ms per call / every. The last column "
          "is the same part by ablation (the all-on window minus the window without it), "
          "a noisier check that also holds what the part changes in the train step.", "",
          "| part | ms per call | every | amortised ms/step | share % | by ablation ms/step |",
          "|---|---:|---:|---:|---:|---:|",
          f"| train step: plain's | {a['plain_ms']:.2f} | 1 | {a['plain_ms']:.2f} | "
          f"{share(a['plain_ms'])} | |",
          f"| train step: ModalImmune's additions (all on - plain) | "
          f"{a['train_step_extra_ms']:.2f} | 1 | {a['train_step_extra_ms']:.2f} | "
          f"{share(a['train_step_extra_ms'])} | |",
          f"| - of which interventions + collapse penalty | | | | | "
          f"{a['interventions_collapse_ablation_ms']:.2f} |",
          f"| - of which BHGD carried (its fixed batches; with - without BHGD) | | | "
          f"{a['bhgd_carried_ms']:.2f} | {share(a['bhgd_carried_ms'])} | |"]
  for name, r in w["programs"].items():
    out.append(f"| {r['what']} (`{name}`) | {r['ms_per_call']:.2f} | {r['every']} | "
               f"{r['amortised_ms']:.3f} | {share(r['amortised_ms'])} | "
               f"{r['ablation_ms']:.2f} ({r['ablation']}) |")
  out += [f"| **amortised all-on step** | | | **{total:.2f}** | 100 | |",
          f"| all-on window (check) | | | {a['window_ms']:.2f} | "
          f"{100 * a['window_ms'] / total:.0f} | |", "",
          f"Amortised all on / plain: {a['ratio_to_plain']:.2f}.", ""]
  hyper = w["programs"].get("bhgd")
  if hyper and "hyper/num_terms" in hyper["last_metrics"]:
    m = hyper["last_metrics"]
    out += [f"The timed hyper-step: {m['hyper/num_terms']:.0f} CG terms (cap "
            f"{info['hyper_terms'][w['workload']]}), error bound {m['hyper/error_bound']:.3g} "
            f"for |g| {m['hyper/grad_norm']:.3g}.", ""]

  if "flops" in w:
    out += render_flops(w)
  f = w["first_step"]
  rounds = f.get("rounds", [])
  out += ["### First step, cold and warm", "",
          "A fresh process each (`--first-step`): cold with an empty persistent compilation "
          "cache, warm with the cache the cold process filled. First step: the first "
          "`step_fn` call (train step + the programs that fire at step 0); compile: every "
          "program's first call minus its second, the hyper-step's included. "
          f"{len(rounds)} round(s), each plain then ModalImmune; each row is the process "
          "with the median first step, and its x plain the ratio of the medians. Each "
          "round's own ratio, cold / warm: "
          + ", ".join(f"{r['cold']:.2f} / {r['warm']:.2f}" for r in rounds) + ".", "",
          "| method | cache | setup s | first step s | x plain | compile, all programs s "
          "| x plain |", "|---|---|---:|---:|---:|---:|---:|"]
  for method in ("plain", "modalimmune"):
    for attempt in ("cold", "warm"):
      r, base = f[method][attempt], f["plain"][attempt]
      out.append(f"| {method} | {attempt} | {r['setup_s']:.1f} | {r['first_step_s']:.2f} | "
                 f"{r['first_step_s'] / base['first_step_s']:.2f} | {r['compile_s']:.2f} | "
                 f"{r['compile_s'] / base['compile_s']:.2f} |")
  cold, warm = f["modalimmune"]["cold"]["programs"], f["modalimmune"]["warm"]["programs"]
  out += ["", "| ModalImmune program | fires at step 0 | cold: first call s | compile s "
          "| warm: first call s | compile s | second call ms |",
          "|---|---|---:|---:|---:|---:|---:|"]
  for name, c in cold.items():
    wm = warm[name]
    out.append(f"| {name} | {'yes' if c['fires_at_step_0'] else 'no'} | "
               f"{c['first_call_s']:.2f} | {c['compile_s']:.2f} | {wm['first_call_s']:.2f} | "
               f"{wm['compile_s']:.2f} | {1e3 * wm['second_call_s']:.1f} |")
  ok = all(f["ratios"][a]["first_step"] <= FIRST_STEP_TARGET for a in ("cold", "warm"))
  out += ["", f"First step within {FIRST_STEP_TARGET:g}x plain's, cold and warm: {met(ok)}.",
          ""]
  if w.get("hyper"):
    out += render_hyper(w["hyper"], w["workload"])
  return out


def render_hyper(h, name):
  st = h["settings"]
  out = [f"### Hyper-gradient solves after {h['train_steps']} plain steps ({name})",
         "",
         f"ModalImmune's inner (damped Gauss-Newton) and outer objectives on its fixed "
         f"batches ({st['hyper_batch_size']} samples), max_terms {h['max_terms']}; "
         f"Neumann with alpha=None (its {POWER_ITERATIONS} power-iteration products are "
         f"counted). Tolerances are relative to the reference |g| (CG, below), except "
         f"hyper_tol, relative to the iterate's own |g| as the training stops. The training "
         f"uses {st['hyper_solver']} at damping {st['hyper_damping']}, hyper_tol "
         f"{st['hyper_tol']} with at most {st['hyper_terms']} terms, and applies a step when "
         f"bound <= {st['hyper_rel_tol']} |g|.", ""]
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
      f"{k} {v:.1f}" for k, v in h["compile_s"].items()), ""]
  return out


def render(record):
  info = record["setup"]
  out = [f"Window W: {'--steps' if info['steps'] else 'per workload, harness.amortising_window'}"
         f"; {info['repeats']} round(s); XLA_FLAGS {info['xla_flags'] or '(none)'}"
         + ("; --quick: smoke sizes, XLA optimisations off, the timings mean nothing"
            if info["quick"] else ""), ""]
  out += render_summary(record)
  for w in record["workloads"]:
    out += render_workload(w, info)
  return "\n".join(out).rstrip("\n") + "\n"


def parse_args(argv=None):
  p = parser(__doc__, "bench_methods")
  workload_flags(p)
  p.add_argument("--repeats", type=int, default=None, help="R rounds (5; --quick 1)")
  p.add_argument("--solvers", action="store_true",
                 help="also section 2, the hyper-gradient solver comparison")
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
  p.add_argument("--first-step-rounds", type=int, default=None,
                 help="rounds of the first-step processes, median (3; --quick 1)")
  p.add_argument("--first-step", metavar="WORKLOAD:METHOD", default=None,
                 help="(internal) print one JSON line: the first step of METHOD on "
                 "WORKLOAD in this process (see 1c)")
  args = p.parse_args(argv)
  quick = args.quick
  pick = lambda value, full, small: value if value is not None else (small if quick else full)
  args.repeats = pick(args.repeats, 5, 1)
  args.first_step_rounds = pick(args.first_step_rounds, 3, 1)
  args.train_steps = pick(args.train_steps, 200, 5)
  args.tols = pick(args.tols, [1e-2, 1e-3, 1e-4], [1e-2])
  args.dampings = pick(args.dampings, [0.1, 1.0], [0.1])
  args.max_terms = pick(args.max_terms, 2000, 200)
  args.hyper_repeats = pick(args.hyper_repeats, 3, 1)
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.threads:
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cpus)  # before the XLA backend starts its thread pool
  if args.first_step:
    return probe_first_step(args)
  log(f"{jax.devices()[0].platform}, {len(jax.devices())} device(s), "
      f"{len(os.sched_getaffinity(0))} CPUs; R={args.repeats}"
      + (f", K={args.train_steps}" if args.solvers else ""))
  record = {"setup": {"platform": jax.devices()[0].platform, "devices": jax.device_count(),
                      "cpus": len(os.sched_getaffinity(0)), "steps": args.steps,
                      "repeats": args.repeats, "quick": args.quick, "dtype": "float32",
                      "solvers": args.solvers, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "compilation_cache": jax.config.jax_compilation_cache_dir,
                      "hyper_terms": {}},
            "workloads": []}
  for workload in bench_workloads(args.quick):
    if workload.name not in args.workloads:
      continue
    dataset = train.load_data(workload.config)
    steps, runs, fresh_plain = bench_steps(args, workload, dataset)
    record["setup"]["hyper_terms"][workload.name] = \
        runs[ALL_ON][0].method.modalimmune.hyper_terms
    steps["first_step"] = first_steps(args, workload)
    if args.solvers:
      steps["hyper"] = bench_hyper(args, runs["plain"], fresh_plain, runs[ALL_ON])
    record["workloads"].append(steps)
    del runs, fresh_plain
  text = render(record)
  print("\n" + text)
  write_results(args.out, "bench_methods", record, text.splitlines(),
                title="bench_methods: ModalImmune's parts against plain (mfeat, MOSI-shaped)",
                seed=0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
