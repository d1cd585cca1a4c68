"""Certified implicit differentiation against jaxopt's ``custom_root``, on the anchors' own problems.

    pip install jaxopt==0.8.5            # the benchmark's only, not a dependency
    python experiments/bench_implicit.py [--repeats 20] [--out DIR]
    python experiments/bench_implicit.py --quick     # smoke run: small problems, 3 repeats

Three bilevel problems, each with an exact answer:

* **ridge**: one log L2 strength, 200 x 50; the oracle is autodiff through the
  closed form (``jnp.linalg.solve``).
* **logistic**: L2-regularised logistic regression, one log strength (jaxopt's
  ``implicit_diff`` example problem), 500 x 30, inner solver 20 Newton steps; the
  oracle is the implicit function theorem with the dense ``jax.hessian`` and
  ``jnp.linalg.solve``.
* **multi-penalty ridge**: one log L2 strength per group of features, 10 groups
  of 10, 300 samples; the oracle is autodiff through the closed form.

For each, the hyper-gradient of the validation loss by
:func:`modalimmune_jax.hypergrad.implicit_solution` (CG, ``rel_tol`` 1e-6,
strong convexity from the smallest L2 strength) and by jaxopt's
``implicit_diff.custom_root`` (CG, jaxopt's default tolerance 1e-5, same
inner solver): relative error against the oracle, our certified bound, and the
time per hyper-gradient (``jax.jit`` of ``jax.grad``, the inner solve included,
identical in every column; median over ``--repeats`` calls, the columns
alternated so machine load hits each alike). Float64 throughout (the errors
are then the solves', not float32 rounding). Writes
``OUT/bench_implicit.{json,md}`` (``--out`` default
``experiments/results/bench_implicit``).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from harness import alternate, log, parser, time_calls, write_results
from modalimmune_jax.hypergrad import SolveReport, implicit_solution


def _split(key, n, d, nv, w, classify=False):
  k = jax.random.split(key, 4)
  x, xv = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (nv, d))
  y, yv = x @ w + jax.random.normal(k[2], (n,)), xv @ w + jax.random.normal(k[3], (nv,))
  if classify:
    y, yv = (y > 0).astype(x.dtype), (yv > 0).astype(x.dtype)
  return x, y, xv, yv


def ridge_problem(n, d, seed=0):
  w = jnp.linspace(-1.0, 1.0, d)
  x, y, xv, yv = _split(jax.random.key(seed), n, d, n, w)
  inner = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2 + jnp.exp(h) / 2 * w @ w
  solve = lambda h, x, y: jnp.linalg.solve(x.T @ x / len(y) + jnp.exp(h) * jnp.eye(d),
                                           x.T @ y / len(y))
  outer = lambda w: jnp.mean((xv @ w - yv) ** 2)
  oracle = jax.grad(lambda h: outer(solve(h, x, y)))
  return dict(inner=inner, solve=solve, outer=outer, data=(x, y), h=jnp.array(-1.0),
              mu=lambda h, x, y: jnp.exp(h), oracle=oracle)


def logistic_problem(n, d, seed=0):
  w = jnp.linspace(-1.0, 1.0, d)
  x, y, xv, yv = _split(jax.random.key(seed), n, d, n, w, classify=True)

  def inner(w, h, x, y):
    z = x @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + jnp.exp(h) / 2 * w @ w

  def solve(h, x, y):  # 20 Newton steps (quadratic convergence: to rounding level)
    step = lambda w, _: (w - jnp.linalg.solve(jax.hessian(inner)(w, h, x, y),
                                              jax.grad(inner)(w, h, x, y)), None)
    return jax.lax.scan(step, jnp.zeros(x.shape[1]), None, length=20)[0]

  outer = lambda w: jnp.mean(jnp.logaddexp(0.0, xv @ w) - yv * (xv @ w))

  def oracle(h):
    w = solve(h, x, y)
    mixed = jax.jacobian(jax.grad(inner), argnums=1)(w, h, x, y)
    return -mixed @ jnp.linalg.solve(jax.hessian(inner)(w, h, x, y), jax.grad(outer)(w))

  return dict(inner=inner, solve=solve, outer=outer, data=(x, y), h=jnp.array(-3.0),
              mu=lambda h, x, y: jnp.exp(h), oracle=oracle)


def multi_ridge_problem(n, groups, size, seed=0):
  d = groups * size
  group = jnp.repeat(jnp.arange(groups), size)
  w = jnp.where(group % 3 == 0, 1.0, jnp.where(group % 3 == 1, 0.1, 0.0))
  x, y, xv, yv = _split(jax.random.key(seed), n, d, n, w)
  inner = lambda w, h, x, y: (jnp.mean((x @ w - y) ** 2) / 2
                              + 0.5 * jnp.sum(jnp.exp(h[group]) * w ** 2))
  solve = lambda h, x, y: jnp.linalg.solve(x.T @ x / len(y) + jnp.diag(jnp.exp(h[group])),
                                           x.T @ y / len(y))
  outer = lambda w: jnp.mean((xv @ w - yv) ** 2)
  oracle = jax.grad(lambda h: outer(solve(h, x, y)))
  return dict(inner=inner, solve=solve, outer=outer, data=(x, y),
              h=jnp.linspace(-2.0, 1.0, groups), mu=lambda h, x, y: jnp.min(jnp.exp(h)),
              oracle=oracle)


def ours(p):
  sol = implicit_solution(p["inner"], solver="cg", rel_tol=1e-6, max_terms=500,
                          strong_convexity=p["mu"])(p["solve"])
  x, y = p["data"]
  return jax.jit(jax.grad(lambda h, r: p["outer"](sol(h, r, x, y)), argnums=(0, 1)))


def jaxopt_grad(p):
  from jaxopt import implicit_diff, linear_solve
  x, y = p["data"]
  solver = implicit_diff.custom_root(jax.grad(p["inner"]), solve=linear_solve.solve_cg)(
      lambda init, h, x, y: p["solve"](h, x, y))
  return jax.jit(jax.grad(lambda h: p["outer"](solver(None, h, x, y))))


def rel_err(g, ref):
  return float(jnp.linalg.norm(jnp.ravel(g - ref)) / jnp.linalg.norm(jnp.ravel(ref)))


def main(argv=None):
  ap = parser(__doc__, "bench_implicit")
  ap.add_argument("--repeats", type=int, default=20, help="timed calls per column and round")
  ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
  args = ap.parse_args(argv)
  if args.quick:
    args.repeats, args.rounds = 3, 1
  with jax.enable_x64(True):
    return measure(args)


def measure(args) -> int:
  sizes = (dict(ridge=(40, 8), logistic=(60, 6), multi=(60, 3, 3)) if args.quick else
           dict(ridge=(200, 50), logistic=(500, 30), multi=(300, 10, 10)))
  problems = {"ridge": ridge_problem(*sizes["ridge"]),
              "logistic": logistic_problem(*sizes["logistic"]),
              "multi-penalty ridge": multi_ridge_problem(*sizes["multi"])}
  try:
    import jaxopt  # noqa: F401
    have_jaxopt = True
  except ImportError:
    have_jaxopt = False
    log("jaxopt is not installed (pip install jaxopt==0.8.5): its column is left out")

  rows = {}
  for name, p in problems.items():
    log(f"{name}: {p['data'][0].shape}, {jnp.size(p['h'])} hyper-parameter(s)")
    ref = p["oracle"](p["h"])
    g, report = ours(p)(p["h"], SolveReport.zeros())
    row = {"num_hparams": int(jnp.size(p["h"])), "shape": list(p["data"][0].shape),
           "ours": {"rel_error": rel_err(g, ref),
                    "abs_error": float(jnp.linalg.norm(jnp.ravel(g - ref))),
                    "error_bound": float(report.error_bound),
                    "certified": bool(report.certified), "products": int(report.products)}}
    row["ours"]["bound_holds"] = row["ours"]["abs_error"] <= row["ours"]["error_bound"]
    jobs = {"ours": lambda p=p: time_calls(ours(p), (p["h"], SolveReport.zeros()),
                                           repeats=args.repeats),
            "oracle": lambda p=p: time_calls(jax.jit(p["oracle"]), (p["h"],),
                                             repeats=args.repeats)}
    if have_jaxopt:
      gj = jaxopt_grad(p)(p["h"])
      row["jaxopt"] = {"rel_error": rel_err(gj, ref)}
      jobs["jaxopt"] = lambda p=p: time_calls(jaxopt_grad(p), (p["h"],), repeats=args.repeats)
    times = alternate(jobs, args.rounds)
    for k, t in times.items():
      row.setdefault(k, {})["ms"] = 1e3 * statistics.median(t)
    rows[name] = row
    log(f"  {row}")

  lines = ["Hyper-gradient of the validation loss; relative error against the exact "
           "answer (closed form or dense solve), float64. Time: ms per hyper-gradient "
           "(`jax.jit(jax.grad(...))`, the inner solve included, the same in every column), "
           f"median of {args.rounds} alternating round(s) x {args.repeats} calls.", "",
           "| problem | hyper-params | ours: rel. error | ours: certified bound (abs.) | "
           "bound holds | CG products | jaxopt `custom_root`: rel. error | ours ms | "
           "jaxopt ms | oracle ms | ours / jaxopt |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    o, j = r["ours"], r.get("jaxopt", {})
    ratio = f"{o['ms'] / j['ms']:.2f}" if j else "—"
    jerr = f"{j['rel_error']:.1e}" if j else "not installed"
    jms = f"{j['ms']:.2f}" if j else "—"
    lines.append(f"| {name} | {r['num_hparams']} | {o['rel_error']:.1e} | "
                 f"{o['error_bound']:.1e} | {'yes' if o['bound_holds'] else 'NO'} | "
                 f"{o['products']} | {jerr} | {o['ms']:.2f} | {jms} | "
                 f"{r['oracle']['ms']:.2f} | {ratio} |")
  lines += ["", "ours: `implicit_solution(inner, solver='cg', rel_tol=1e-6, "
            "strong_convexity=min L2 strength)`; the bound is on the absolute error "
            "of the hyper-gradient and rests on that strong convexity. jaxopt: "
            "`custom_root(jax.grad(inner), solve=linear_solve.solve_cg)` at its default "
            "tolerance, no error bound. The oracle column times the exact answer's own "
            "computation (autodiff through the closed form, or the dense Hessian solve)."]
  print("\n".join(lines))
  write_results(args.out, "bench_implicit", {"rows": rows, "quick": args.quick,
                                             "repeats": args.repeats, "rounds": args.rounds},
                lines, title="Certified implicit differentiation against jaxopt's custom_root",
                details=("float64",))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
