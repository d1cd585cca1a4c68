"""Benchmark of the core library's costs, as ratios measured in one run.

    python experiments/bench_core.py [--repeats 30] [--out DIR]
    python experiments/bench_core.py --quick     # smoke run: 3 repeats, 10-step windows

Prints (and writes with provenance to ``OUT/bench_core.{json,md}``, ``--out``
default ``experiments/results/bench_core``):
  * one ``hvp`` / one gradient,
  * ``neumann_hypergrad`` with K terms / one ``hvp`` for K in (5, 10, 20, 50),
  * a training step with ``curvature_mask`` (refresh every 10) / without.
Targets (issue 2): hyper-gradient within K + 3 HVPs, masked step within 1.3x.

The workload is a 2-layer MLP classifier (batch 256, 64 -> 256 -> 256 -> 10)
whose inner loss has the ModalImmune collapse penalty on its hidden embedding,
with two hyper-parameters (log L2 strength, log penalty weight).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax

from harness import log, no_gc, parser, time_calls, write_results
from modalimmune_jax import curvature, hypergrad, spectral

BATCH, D_IN, HIDDEN, CLASSES = 256, 64, 256, 10


def make_problem(seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  params = {
      "w1": jax.random.normal(k[0], (D_IN, HIDDEN)) / jnp.sqrt(D_IN),
      "b1": jnp.zeros(HIDDEN),
      "w2": jax.random.normal(k[1], (HIDDEN, HIDDEN)) / jnp.sqrt(HIDDEN),
      "b2": jnp.zeros(HIDDEN),
      "w3": jax.random.normal(k[2], (HIDDEN, CLASSES)) / jnp.sqrt(HIDDEN),
  }
  x = jax.random.normal(k[3], (BATCH, D_IN))
  y = jax.random.randint(k[4], (BATCH,), 0, CLASSES)
  xv = jax.random.normal(k[5], (BATCH, D_IN))
  return params, (x, y), (xv, y)


def forward(p, x):
  h = jax.nn.gelu(x @ p["w1"] + p["b1"])
  z = jax.nn.gelu(h @ p["w2"] + p["b2"])
  return z @ p["w3"], z


def task_loss(p, x, y):
  logits, _ = forward(p, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def inner_loss(p, hp, x, y):
  logits, z = forward(p, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  l2 = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))
  return (ce + jnp.exp(hp["log_l2"]) * l2
          + jnp.exp(hp["log_lambda"]) * spectral.collapse_penalty(z, 0.9, 0.05))


def outer_loss(p, hp, x, y):
  return task_loss(p, x, y)


def main(argv=None) -> int:
  p = parser(__doc__, "bench_core")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per median (30)")
  args = p.parse_args(argv)
  args.repeats = args.repeats or (3 if args.quick else 30)
  window = 10 if args.quick else 100  # steps per timed window of the optimiser steps

  params, (x, y), (xv, yv) = make_problem()
  hp = {"log_l2": jnp.log(1e-4), "log_lambda": jnp.log(0.1)}
  loss = lambda p: inner_loss(p, hp, x, y)
  tangent = jax.tree.map(jnp.ones_like, params)

  log("grad and hvp")
  t_grad = time_calls(jax.jit(jax.grad(loss)), (params,), repeats=args.repeats)
  t_hvp = time_calls(jax.jit(lambda p, v: curvature.hvp(loss, p, v)), (params, tangent),
                     repeats=args.repeats)
  rows = [("hvp / grad", t_hvp / t_grad, "2-4 (forward-over-reverse)")]

  hyper = {}
  for k in (5, 10, 20, 50):
    log(f"neumann_hypergrad K={k}")
    fn = jax.jit(lambda p, h, k=k: hypergrad.neumann_hypergrad(
        inner_loss, outer_loss, p, h, inner_args=(x, y), outer_args=(xv, yv),
        alpha=0.5, damping=1e-3, num_terms=k))
    t = time_calls(fn, (params, hp), repeats=max(5, args.repeats // 3))
    hyper[k] = t / t_hvp
    rows.append((f"neumann_hypergrad K={k} / hvp", t / t_hvp, f"<= {k + 3}"))

  def make_step(opt, masked):
    @jax.jit
    def step(p, s):
      g = jax.grad(loss)(p)
      kw = {"obj_fn": loss} if masked else {}
      u, s = opt.update(g, s, p, **kw)
      return optax.apply_updates(p, u), s
    return step

  def time_steps(opt, masked, n=window):
    step = make_step(opt, masked)
    p, s = params, opt.init(params)
    p, s = jax.block_until_ready(step(p, s))
    # whole refresh cycles, so the amortised cost is what is measured
    runs = []
    for _ in range(3):
      with no_gc():
        t0 = time.perf_counter()
        for _ in range(n):
          p, s = step(p, s)
        jax.block_until_ready(p)
        runs.append((time.perf_counter() - t0) / n)
    return min(runs)

  log("plain and masked optimiser steps")
  t_plain = time_steps(optax.adam(1e-3), False)
  t_masked = time_steps(optax.chain(curvature.curvature_mask("hard", refresh_every=10),
                                    optax.adam(1e-3)), True)
  rows.append(("masked step / plain step (refresh 10)", t_masked / t_plain, "<= 1.3"))

  lines = [f"Core costs on {jax.devices()[0].platform} ({os.cpu_count()} cores), "
           f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-{CLASSES}, batch {BATCH}", "",
           "| measurement | ratio | target |", "|---|---|---|"]
  lines += [f"| {name} | {ratio:.2f} | {target} |" for name, ratio, target in rows]
  lines += ["", f"absolute: grad {t_grad * 1e3:.2f} ms, hvp {t_hvp * 1e3:.2f} ms, "
            f"plain step {t_plain * 1e3:.2f} ms, masked step {t_masked * 1e3:.2f} ms"]
  print("\n" + "\n".join(lines))
  record = {
      "ratios": {name: ratio for name, ratio, _ in rows},
      "seconds": {"grad": t_grad, "hvp": t_hvp, "plain_step": t_plain,
                  "masked_step": t_masked},
      "config": {"batch": BATCH, "d_in": D_IN, "hidden": HIDDEN, "classes": CLASSES,
                 "repeats": args.repeats, "step_window": window, "hyper_alpha": 0.5,
                 "damping": 1e-3, "quick": args.quick},
  }
  write_results(args.out, "bench_core", record, lines, title="Core costs", seed=0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
