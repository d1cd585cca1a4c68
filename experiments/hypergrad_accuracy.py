"""The hyper-gradient's accuracy on the training model's own BHGD problem, against a dense solve.

    python experiments/hypergrad_accuracy.py [--steps 200] [--out DIR]
    python experiments/hypergrad_accuracy.py --quick     # smoke run: 20 steps, fewer K

ModalImmune is trained on the synthetic benchmark (a small model: hidden 16,
about 6000 parameters, so that its curvature fits in memory as a matrix) for
``--steps`` steps with BHGD off (``--quick``: hidden 4, at initialisation); at the trained parameters BHGD's problem is
set up exactly as the training step sets it up (``bhgd_objectives`` on the
method's fixed train and valid batches, damped Gauss-Newton curvature). The
**exact** hyper-gradient comes from a dense solve in float64 built without the
library's products: the output Jacobian by ``jax.jacrev``, the outputs'
Hessian by ``jax.hessian``, ``A = J^T H J + damping I``, the mixed term by
``jax.jacfwd`` of ``jax.grad``, then ``jnp.linalg.solve``.

Then ``neumann_hypergrad`` with ``K`` = 1, 2, 4, ... terms, Neumann (``alpha``
from power iteration) and CG: its relative error against the exact answer and
its certified bound (``error_bound / |exact|``), against the curvature products
it took. Writes ``OUT/hypergrad_accuracy.{json,md,png}`` (``--out`` default
``experiments/results/hypergrad_accuracy``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from harness import get_config, log, parser, write_results
from modalimmune_jax import train
from modalimmune_jax.hypergrad import neumann_hypergrad
from modalimmune_jax.methods import modalimmune as mi
from modalimmune_jax.step import host_copy, shard_batch


def trained_problem(steps: int, hidden: int, batch: int, seed: int = 0):
  config = get_config("synthetic", "smoke")
  config.seed = seed
  config.method.name = "modalimmune"
  config.model.hidden, config.model.num_heads = hidden, 2
  m = config.method.modalimmune
  m.bhgd, m.hyper_batch_size = False, batch
  run = train.setup(config, num_devices=1)
  state = run.state
  for s in range(steps):
    state, _ = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                           jax.random.fold_in(jax.random.key(seed), s), s)
  settings = mi.Settings(**{k: (tuple(v) if isinstance(v, list) else v)
                            for k, v in m.to_dict().items()})
  settings = settings._replace(bhgd=True)
  inner, outer = mi.bhgd_objectives(run.model.in_float32(), settings)
  ms = host_copy(state.method_state)
  train_b, val = mi.hyper_batches(run.dataset, settings.hyper_batch_size, config.seed)
  alpha = jnp.asarray(ms.controller.alpha)
  return dict(inner=inner, outer=outer, params=host_copy(state.params), phi=ms.phi,
              inner_args=(train_b, alpha), outer_args=(val,), damping=settings.hyper_damping)


def dense_hypergrad(p):
  """``g_phi - M^T A^{-1} g_theta`` from dense float64 matrices."""
  inner, params, phi = p["inner"], p["params"], p["phi"]
  flat, unravel = ravel_pytree(params)
  flat_phi, unravel_phi = ravel_pytree(phi)
  out_fn = lambda f: ravel_pytree(inner.model_fn(unravel(f), phi, *p["inner_args"]))[0]
  outputs = inner.model_fn(params, phi, *p["inner_args"])
  flat_out, unravel_out = ravel_pytree(outputs)
  jac = jax.jit(jax.jacrev(out_fn))(flat)
  h_out = jax.jit(jax.hessian(lambda o: inner.output_loss(unravel_out(o), phi,
                                                          *p["inner_args"])))(flat_out)
  log(f"jacobian {jac.shape}, output hessian {h_out.shape}")
  j64, h64 = np.asarray(jac, np.float64), np.asarray(h_out, np.float64)
  from threadpoolctl import threadpool_limits  # BLAS beside JAX: one thread, as the
  blas = threadpool_limits(limits=1, user_api="blas")  # reference fits run (2-core CPU)
  a = j64.T @ h64 @ j64 + p["damping"] * np.eye(flat.size)
  grad_theta = lambda f, fp: ravel_pytree(jax.grad(inner)(unravel(f), unravel_phi(fp),
                                                          *p["inner_args"]))[0]
  mixed = np.asarray(jax.jit(jax.jacfwd(grad_theta, argnums=1))(flat, flat_phi), np.float64)
  g_theta, g_phi = jax.grad(p["outer"], argnums=(0, 1))(params, phi, *p["outer_args"])
  g_theta = np.asarray(ravel_pytree(g_theta)[0], np.float64)
  g_phi = np.asarray(ravel_pytree(g_phi)[0], np.float64)
  exact = g_phi - mixed.T @ np.linalg.solve(a, g_theta)
  eig = np.linalg.eigvalsh(a)
  blas.restore_original_limits()
  return exact, {"num_params": int(flat.size), "lambda_min": float(eig[0]),
                 "lambda_max": float(eig[-1]), "condition": float(eig[-1] / eig[0])}


def sweep(p, exact, terms):
  rows = []
  norm = float(np.linalg.norm(exact))
  for solver in ("neumann", "cg"):
    # K traced: one compiled program per solver for every K
    fn = jax.jit(lambda params, phi, k, solver=solver: neumann_hypergrad(
        p["inner"], p["outer"], params, phi, inner_args=p["inner_args"],
        outer_args=p["outer_args"], solver=solver, damping=p["damping"], num_terms=k))
    for k in terms:
      g, cert = fn(p["params"], p["phi"], jnp.asarray(k))
      err = float(np.linalg.norm(np.asarray(ravel_pytree(g)[0], np.float64) - exact))
      rows.append({"solver": solver, "terms": k, "products": int(cert.num_products),
                   "rel_error": err / norm, "rel_bound": float(cert.error_bound) / norm,
                   "bound_holds": err <= float(cert.error_bound), "certified": bool(cert.certified),
                   "diverging": bool(cert.diverging)})
      log(f"{solver} K={k}: rel error {err / norm:.2e}, bound {rows[-1]['rel_bound']:.2e}")
  return rows


def plot(rows, path, info):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.2, 4.2), dpi=150)
  for solver, color in (("neumann", "#DD8452"), ("cg", "#4C72B0")):
    rs = [r for r in rows if r["solver"] == solver]
    x = [r["products"] for r in rs]
    ax.plot(x, [r["rel_error"] for r in rs], "o-", color=color, ms=3,
            label=f"{solver}: error against the dense solve")
    ax.plot(x, [r["rel_bound"] for r in rs], "--", color=color,
            label=f"{solver}: certified bound")
  ax.set(xscale="log", yscale="log", xlabel="curvature products",
         ylabel="relative error of the hyper-gradient",
         title=f"BHGD's problem, {info['num_params']} parameters, "
               f"cond(A) = {info['condition']:.0f}")
  ax.legend(frameon=False, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None):
  ap = parser(__doc__, "hypergrad_accuracy")
  ap.add_argument("--steps", type=int, default=200, help="training steps before the solve")
  args = ap.parse_args(argv)
  steps = 0 if args.quick else args.steps
  hidden, batch = (4, 16) if args.quick else (16, 32)
  terms = (1, 4, 16, 64) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
  log(f"training {steps} steps")
  p = trained_problem(steps, hidden, batch)
  log("dense solve")
  exact, info = dense_hypergrad(p)
  log(f"dense: {info}")
  rows = sweep(p, exact, terms)
  lines = [f"ModalImmune on synthetic (hidden {hidden}, {info['num_params']} parameters, "
           f"BHGD batches of {batch}), "
           f"{steps} training steps, BHGD's problem at the trained point: damped "
           f"Gauss-Newton (damping {p['damping']}), lambda_min {info['lambda_min']:.3g}, "
           f"lambda_max {info['lambda_max']:.3g}, condition {info['condition']:.0f}. "
           "Exact answer: dense float64 solve; the solves' products in float32.", "",
           "| solver | K | products | relative error | certified bound (relative) | "
           "bound holds |", "|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['solver']} | {r['terms']} | {r['products']} | {r['rel_error']:.2e} | "
                 f"{r['rel_bound']:.2e} | {'yes' if r['bound_holds'] else 'NO'} |")
  print("\n".join(lines))
  os.makedirs(args.out, exist_ok=True)
  plot(rows, os.path.join(args.out, "hypergrad_accuracy.png"), info)
  write_results(args.out, "hypergrad_accuracy", {"rows": rows, "dense": info, "steps": steps,
                                                 "quick": args.quick}, lines,
                title="The hyper-gradient's accuracy against a dense solve")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
