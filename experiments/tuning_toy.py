"""BHGD against Optuna's TPE, random search and grid search on a toy with a known optimum.

    python experiments/tuning_toy.py [--seeds 10] [--budget 100] [--out DIR]
    python experiments/tuning_toy.py --quick     # smoke run: 2 seeds, 12 evaluations

The toy (../shared/BASELINES.md): ridge regression with three L2 strengths, one
per group of 10 features (strong, weak and zero true weights), 60 training, 200
validation and 2000 test samples, the strengths searched as natural logs in
``[-6, 4]^3``. Its **known optimum** is the best of L-BFGS-B runs (scipy, exact
gradients through the closed form, float64) from 20 starts in the box.

Each tuner spends its budget of evaluations (one evaluation: an inner solve and
the validation loss), from the same clock start, every program compiled
before:

* **BHGD**: Adam (lr 0.1) on the log strengths with the certified implicit
  hyper-gradient (:func:`modalimmune_jax.hypergrad.implicit_solution`, CG,
  ``rel_tol`` 1e-3, strong convexity from the smallest strength), a step
  applied only when certified, projected onto the box; one evaluation per
  step; the start drawn uniformly in the box by the seed.
* **TPE** (``optuna.samplers.TPESampler(seed)``), **random**
  (``RandomSampler(seed)``): ``--budget`` trials of an in-memory study.
* **grid**: the 8^3 grid over the box (512 evaluations, its own budget),
  visited in the random order of ``GridSampler(seed)``.

Reported per tuner, over ``--seeds`` seeds: how many seeds came within 1 % of
the optimum's validation loss, the median evaluations and wall-clock seconds
to get there, the best validation loss at the end of the budget and the test
loss of the configuration it chose. ``tuning_toy.png``: the best validation
loss so far (excess over the optimum, relative) against wall-clock, median
and interquartile band over seeds. Writes ``OUT/tuning_toy.{json,md,png}``
(``--out`` default ``experiments/results/tuning_toy``).
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from harness import log, parser, write_results
from modalimmune_jax.hypergrad import SolveReport, implicit_solution

GROUPS, SIZE = 3, 10
N_TRAIN, N_VAL, N_TEST = 60, 200, 2000
LOW, HIGH = -6.0, 4.0
GRID = 8
WITHIN = 0.01  # "within 1 % of the optimum"
BHGD_OPT = optax.adam(0.1)


def make_problem(seed: int = 0):
  group = jnp.repeat(jnp.arange(GROUPS), SIZE)
  w_true = jnp.where(group == 0, 1.0, jnp.where(group == 1, 0.2, 0.0))
  k = jax.random.split(jax.random.key(seed), 6)
  dtype = jnp.result_type(float)  # float64 in known_optimum's x64, the same draws

  def draw(kx, ky, n):
    x = jax.random.normal(kx, (n, GROUPS * SIZE), jnp.float32)
    y = x @ w_true.astype(jnp.float32) + jax.random.normal(ky, (n,), jnp.float32)
    return x.astype(dtype), y.astype(dtype)

  (x, y), (xv, yv), (xt, yt) = (draw(k[0], k[1], N_TRAIN), draw(k[2], k[3], N_VAL),
                                draw(k[4], k[5], N_TEST))

  def inner(w, h, x, y):
    return jnp.mean((x @ w - y) ** 2) / 2 + 0.5 * jnp.sum(jnp.exp(h[group]) * w ** 2)

  def solve(h, x, y):
    a = x.T @ x / len(y) + jnp.diag(jnp.exp(h[group]))
    return jnp.linalg.solve(a, x.T @ y / len(y))

  val = jax.jit(lambda h: jnp.mean((xv @ solve(h, x, y) - yv) ** 2))
  test = jax.jit(lambda h: jnp.mean((xt @ solve(h, x, y) - yt) ** 2))
  ridge = implicit_solution(inner, solver="cg", rel_tol=1e-3,
                            strong_convexity=lambda h, x, y: jnp.min(jnp.exp(h)))(solve)
  hyper = jax.value_and_grad(lambda h, r: jnp.mean((xv @ ridge(h, r, x, y) - yv) ** 2),
                             argnums=(0, 1))

  @jax.jit
  def bhgd_step(h, opt_state):
    """One evaluation and, if its hyper-gradient is certified, one projected step."""
    value, (g, report) = hyper(h, SolveReport.zeros())
    updates, new_state = BHGD_OPT.update(g, opt_state)
    ok = report.certified
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    h_new = jnp.clip(optax.apply_updates(h, updates), LOW, HIGH)
    return value, keep(h_new, h), keep(new_state, opt_state)

  return {"val": val, "test": test, "bhgd_step": bhgd_step}


def known_optimum(problem, starts: int = 20, seed: int = 0):
  """The best of L-BFGS-B runs in the box (float64, exact gradients)."""
  from scipy.optimize import minimize
  with jax.enable_x64(True):
    p = make_problem()
    f = jax.jit(jax.value_and_grad(lambda h: p["val"](h)))
    rng = np.random.default_rng(seed)
    best = None
    for h0 in rng.uniform(LOW, HIGH, (starts, GROUPS)):
      r = minimize(lambda h: tuple(np.asarray(v, np.float64) for v in f(jnp.asarray(h))),
                   h0, jac=True, method="L-BFGS-B", bounds=[(LOW, HIGH)] * GROUPS)
      if best is None or r.fun < best.fun:
        best = r
  return {"h": [float(v) for v in best.x], "val": float(best.fun),
          "test": float(problem["test"](jnp.asarray(best.x, jnp.float32)))}


def run_bhgd(problem, seed: int, budget: int):
  h = jnp.asarray(np.random.default_rng(seed).uniform(LOW, HIGH, GROUPS), jnp.float32)
  state = BHGD_OPT.init(h)
  trace, t0 = [], time.perf_counter()
  for _ in range(budget):
    value, h_next, state = problem["bhgd_step"](h, state)
    trace.append((time.perf_counter() - t0, float(value), np.asarray(h)))
    h = h_next
  return trace


def run_optuna(problem, sampler, budget: int):
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study = optuna.create_study(sampler=sampler)
  trace, t0 = [], time.perf_counter()

  def objective(trial):
    h = np.array([trial.suggest_float(f"log_l2_{g}", LOW, HIGH) for g in range(GROUPS)],
                 np.float32)
    value = float(problem["val"](jnp.asarray(h)))
    trace.append((time.perf_counter() - t0, value, h))
    return value

  study.optimize(objective, n_trials=budget)
  return trace


def time_to(trace, target: float):
  """(evaluations, seconds) until the best validation loss so far is <= target; None if never."""
  best = np.inf
  for i, (t, v, _) in enumerate(trace):
    best = min(best, v)
    if best <= target:
      return i + 1, t
  return None


def summarise(trace, problem, targets: dict):
  k = int(np.argmin([v for _, v, _ in trace]))
  out = {"evals": len(trace), "seconds": trace[-1][0], "best_val": float(trace[k][1]),
         "test_of_best": float(problem["test"](jnp.asarray(trace[k][2])))}
  for name, target in targets.items():
    hit = time_to(trace, target)
    out[name] = {"reached": hit is not None, "evals": hit[0] if hit else None,
                 "seconds": hit[1] if hit else None}
  return out


def plot(curves: dict, optimum: float, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=150)
  for (name, traces), color in zip(curves.items(), ("#C44E52", "#4C72B0", "#DD8452",
                                                    "#55A868")):
    end = max(tr[-1][0] for tr in traces)
    grid = np.geomspace(min(tr[0][0] for tr in traces) + 1e-6, end, 200)
    rows = []
    for tr in traces:
      t = np.array([a for a, _, _ in tr])
      best = np.minimum.accumulate([v for _, v, _ in tr])
      idx = np.searchsorted(t, grid, side="right") - 1
      rows.append(np.where(idx >= 0, (best[np.maximum(idx, 0)] - optimum) / optimum, np.nan))
    rows = np.array(rows)
    med = np.nanmedian(rows, 0)
    ax.plot(grid, med, color=color, label=name)
    ax.fill_between(grid, np.nanpercentile(rows, 25, 0), np.nanpercentile(rows, 75, 0),
                    color=color, alpha=0.2, lw=0)
  ax.axhline(WITHIN, color="#333333", ls=":", lw=1, label="within 1 % of the optimum")
  ax.set(xscale="log", yscale="log", xlabel="wall-clock (s)",
         ylabel="best validation loss so far / optimum - 1",
         title="3-penalty ridge: tuners against a known optimum")
  ax.legend(frameon=False, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  ap = parser(__doc__, "tuning_toy")
  ap.add_argument("--seeds", type=int, default=10, help="seeds per tuner")
  ap.add_argument("--budget", type=int, default=100,
                  help="evaluations for BHGD, TPE and random (grid: its 8^3 points)")
  args = ap.parse_args(argv)
  if args.quick:
    args.seeds, args.budget = 2, 12
  import optuna
  problem = make_problem()
  h0 = jnp.zeros(GROUPS)
  problem["val"](h0), problem["test"](h0), problem["bhgd_step"](h0, BHGD_OPT.init(h0))  # compile
  optimum = known_optimum(problem, starts=4 if args.quick else 20)
  log(f"known optimum: val {optimum['val']:.4f} at log strengths {optimum['h']}")
  grid_values = list(np.linspace(LOW, HIGH, GRID))
  grid_budget = 2 * args.budget if args.quick else GRID ** GROUPS
  tuners = {
      "BHGD (certified hyper-gradient)": lambda s: run_bhgd(problem, s, args.budget),
      "TPE (Optuna)": lambda s: run_optuna(problem, optuna.samplers.TPESampler(seed=s),
                                           args.budget),
      "random search": lambda s: run_optuna(problem, optuna.samplers.RandomSampler(seed=s),
                                            args.budget),
      f"grid search ({GRID}^{GROUPS})": lambda s: run_optuna(
          problem, optuna.samplers.GridSampler(
              {f"log_l2_{g}": grid_values for g in range(GROUPS)}, seed=s), grid_budget),
  }
  traces = {name: [] for name in tuners}
  for s in range(args.seeds):  # tuners alternate within each seed (load hits all alike)
    for name, fn in tuners.items():
      traces[name].append(fn(s))
    log(f"seed {s} done")
  grid_name = f"grid search ({GRID}^{GROUPS})"
  # two common targets: within 1 % of the optimum, and the best the full grid finds
  # (every order of the grid ends at the same best point)
  grid_best = min(v for _, v, _ in traces[grid_name][0])
  targets = {"optimum": optimum["val"] * (1 + WITHIN), "grid_best": grid_best}
  results = {name: [summarise(tr, problem, targets) for tr in trs]
             for name, trs in traces.items()}

  def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

  fmt = lambda x, f: "—" if x is None else format(x, f)
  lines = [f"Known optimum: validation MSE {optimum['val']:.4f} (test {optimum['test']:.4f}) "
           f"at log L2 strengths {[round(v, 2) for v in optimum['h']]}. Targets: within "
           f"{WITHIN:.0%} of it ({targets['optimum']:.4f}), and the best point of the full "
           f"grid ({grid_best:.4f}, whose order differs by seed). {args.seeds} seeds per "
           f"tuner; budget {args.budget} evaluations (grid: {grid_budget}). Medians over "
           "the seeds that reached the target.", "",
           "| tuner | within 1 %: seeds | evaluations | seconds | grid's best: seeds | "
           "evaluations | seconds | best valid (median) | test of the chosen config "
           "(median) | ms per evaluation |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  summary = {}
  for name, rs in results.items():
    row = {"seeds": len(rs), "best_val": statistics.median(r["best_val"] for r in rs),
           "test_of_best": statistics.median(r["test_of_best"] for r in rs),
           "seconds_per_eval": statistics.median(r["seconds"] / r["evals"] for r in rs)}
    for t in targets:
      row[t] = {"reached": sum(r[t]["reached"] for r in rs),
                "evals": med([r[t]["evals"] for r in rs]),
                "seconds": med([r[t]["seconds"] for r in rs])}
    summary[name] = row
    cells = [f"{row[t]['reached']}/{row['seeds']} | {fmt(row[t]['evals'], '.0f')} | "
             f"{fmt(row[t]['seconds'], '.4f')}" for t in targets]
    lines.append(f"| {name} | {' | '.join(cells)} | {row['best_val']:.4f} | "
                 f"{row['test_of_best']:.4f} | {1e3 * row['seconds_per_eval']:.2f} |")
  bhgd, grid = summary["BHGD (certified hyper-gradient)"], summary[grid_name]
  lines.append("")
  if bhgd["grid_best"]["seconds"] is not None:
    exhaustive = statistics.median(r["seconds"] for r in results[grid_name])
    t = bhgd["grid_best"]["seconds"]
    lines.append(f"To reach the grid's best value, BHGD took {t:.4f} s (median over the "
                 f"{bhgd['grid_best']['reached']} seeds where it got there): "
                 f"{1 - t / grid['grid_best']['seconds']:.0%} less wall-clock than the grid "
                 f"needed to find that point, {1 - t / exhaustive:.0%} less than the "
                 f"exhaustive grid's {exhaustive:.4f} s (the paper: BHGD about 38 % less "
                 "than exhaustive grid search). Here an evaluation is a sub-millisecond "
                 "solve, so these times are mostly dispatch and sampler overhead.")
  if grid["optimum"]["reached"] == 0:
    lines.append("The grid never came within 1 % of the optimum (its points are 1.43 apart "
                 "in log strength).")
  print("\n".join(lines))
  os.makedirs(args.out, exist_ok=True)
  plot(traces, optimum["val"], os.path.join(args.out, "tuning_toy.png"))
  write_results(args.out, "tuning_toy",
                {"optimum": optimum, "summary": summary, "runs": results,
                 "budget": args.budget, "grid_budget": grid_budget, "quick": args.quick},
                lines, title="BHGD against TPE, random and grid search (3-penalty ridge)",
                seeds=list(range(args.seeds)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
