"""A few data-parallel training steps, for the multi-device / multi-process tests.

    python tests/dp_worker.py devices OUT.npz               (XLA_FLAGS sets N CPU devices)
    python tests/dp_worker.py modalimmune OUT.npz           (the same, ModalImmune)
    python tests/dp_worker.py consistency OUT.npz           (the same, consistency regularisation)
    python tests/dp_worker.py cmpt OUT.npz                  (the same, CMPT across its freeze)
    python tests/dp_worker.py ebr+distill OUT.npz           (EBR, then distillation, tiny model)
    python tests/dp_worker.py process OUT.npz PORT NPROC PID  (jax.distributed over gloo)

Writes the flat final parameters (and method state) of the N-device and the
1-device run to OUT.npz (``many``, ``one``; for a ``+`` mode ``many_<method>``,
``one_<method>`` per method, one process hosting several checks).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 4


def run_steps(config, num_devices=0, steps=STEPS):
  """``steps`` SGD steps on ``num_devices`` (0 = all) devices.

  SGD, not the run's Adam: Adam divides each gradient by its own running
  magnitude, so for parameters whose gradient is at rounding level (padding
  positions, say) it turns the summation-order noise of a different device
  count into lr-sized differences. The subject here is the data-parallel
  reduction, which SGD passes through unamplified. The same holds for the
  optimisers a method builds for its own parameters (EBR's nets, the
  distillation teacher: ``build.make_optimizer``, Adam), made SGD here too
  (the teacher's attention key biases have an exactly zero gradient, which
  Adam turns into lr-sized steps of rounding noise).
  """
  from unittest import mock

  import jax
  import numpy as np
  import optax

  from modalimmune_jax import build, train
  from modalimmune_jax.step import host_copy, shard_batch
  with mock.patch.object(build, "make_optimizer", lambda *a, **k: optax.sgd(0.05)):
    run = train.setup(config, optimizer=optax.sgd(0.05), num_devices=num_devices)
  state, step, batches, mesh = run.state, run.step_fn, run.batches, run.mesh
  rng = jax.random.key(config.seed)
  for s in range(steps):
    state, metrics = step(state, shard_batch(batches(s), mesh), jax.random.fold_in(rng, s))
  state = host_copy(state)
  leaves = jax.tree.leaves((state.params, state.method_state))
  flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])
  return flat, mesh.devices.size, state


def worker_config(method="plain"):
  from tests.helpers import get_config
  config = get_config("synthetic", "smoke")
  config.train.batch_size = 16
  config.data.synthetic.shapes = {"text": (5, 6), "audio": (1, 4), "vision": (3, 2)}
  config.data.synthetic.variable_length = True
  config.method.name = method
  if method == "modalimmune":  # every part active within STEPS steps
    # one-frame modalities: the data-parallel parts under test here are
    # ModalImmune's own (global-batch statistics, draws, hyper-gradient); the
    # encoders' frame masks are checked by the other modes, and their attention,
    # repeated in each of ModalImmune's extra passes, adds 60% to this compile time
    config.data.synthetic.shapes = {"text": (1, 6), "audio": (1, 4), "vision": (1, 2)}
    mi = config.method.modalimmune
    mi.ctrl_every, mi.hyper_every, mi.mask_every = 1, 2, 2
    mi.hyper_terms, mi.hyper_batch_size, mi.p_destroy = 4, 16, 0.5
    # soft mask: continuous in the curvature estimate, so rounding-level
    # differences between device counts cannot flip a coordinate in or out
    mi.mask_mode = "soft"
  if method == "consistency":  # every perturbation, and a PGD step that moves delta
    co = config.method.consistency
    co.weight, co.pgd_eps, co.pgd_step_size = 0.5, 0.05, 10.0
  if method == "cmpt":  # 2 plain steps, then 2 with sample-eta drops and alignment
    config.method.cmpt.pretrain_fraction = 2 / config.train.steps
  if method in ("ebr", "distill"):  # a tiny model: these checks are about the reductions
    config.data.synthetic.shapes = {"text": (1, 6), "audio": (1, 4), "vision": (1, 2)}
    config.data.synthetic.variable_length = False
    config.model.hidden, config.model.num_heads = 8, 2
    config.method.ebr.shared_dim, config.method.ebr.hidden = 8, 8
  if method == "ebr":  # the fill's cross term and dropout (per-device cell counts differ)
    config.method.ebr.cross_weight, config.method.ebr.dropout_rate = 1.0, 0.5
  if method == "distill":  # 2 teacher steps, then 2 distilling; student dropout makes the
    d = config.method.distill  # devices' present-cell counts differ (global denominators)
    d.teacher_fraction, d.dropout_rate = 2 / config.train.steps, 0.5
  return config


def main():
  import numpy as np
  mode, out = sys.argv[1], sys.argv[2]
  if mode == "process":
    port, nproc, pid = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    params, n, _ = run_steps(worker_config())
    if jax.process_index() == 0:
      np.savez(out, params=params, devices=n, processes=jax.process_count())
    jax.distributed.shutdown()
  elif "+" in mode:  # several methods in one process (one interpreter and jax start)
    res = {}
    for method in mode.split("+"):
      res[f"many_{method}"], n, _ = run_steps(worker_config(method))
      res[f"one_{method}"], _, _ = run_steps(worker_config(method), num_devices=1)
    np.savez(out, devices=n, **res)
  else:
    method = mode if mode in ("modalimmune", "consistency", "cmpt") else "plain"
    many, n, state = run_steps(worker_config(method))
    one, _, _ = run_steps(worker_config(method), num_devices=1)
    extra = {}
    if method == "modalimmune":
      ms = state.method_state
      extra = dict(hyper_applied=ms.hyper.applied, hyper_rejected=ms.hyper.rejected,
                   ctrl_count=ms.controller.count)
    np.savez(out, many=many, one=one, devices=n, **extra)


if __name__ == "__main__":
  main()
