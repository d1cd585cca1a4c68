"""Training and evaluation: the pure step, the data-parallel step, the loop.

The model is split once into ``(graphdef, params)``; everything below is a pure
function of ``params`` (an ``nnx.State``):

* :func:`make_loss_fn` ``(params, batch, rng) -> (loss, metrics)``: task loss,
  the reconstruction loss when the model has a generator, and any extra
  :class:`Method` loss terms.
* :func:`make_train_step` ``(params, opt_state, batch, rng) -> (params,
  opt_state, metrics)``, driven by any optax chain. The objective of the batch
  is passed to ``optimizer.update`` as the extra argument ``obj_fn`` (as
  ``optax.contrib.sophia`` expects), so curvature-aware transformations plug in
  without touching the loop. A non-finite loss or gradient leaves params and
  optimiser state unchanged and is counted (``metrics["nonfinite"]``).
* :func:`make_parallel_step`: ``jax.jit`` of ``jax.shard_map`` over a 1-D mesh
  axis ``"data"``; the global batch is split across devices and gradients and
  metrics are averaged with ``lax.pmean``. The same code runs on 1 or N devices
  and across processes (``jax.distributed``).
* :func:`train_and_evaluate`: the loop with orbax checkpoints (resume from the
  latest good one), a progress bar, JSON-lines metrics and the missing-modality
  protocol at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from modalimmune_jax import data as data_lib
from modalimmune_jax import protocol
from modalimmune_jax.config import validate_config
from modalimmune_jax.metrics import HEADLINE
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.plots import plot_protocol
from modalimmune_jax.provenance import provenance

__all__ = [
    "Method", "PLAIN", "NonFiniteError", "load_data", "build_model", "make_optimizer",
    "task_loss", "make_loss_fn", "make_train_step", "make_mesh", "make_parallel_step",
    "shard_batch", "make_predict_fn", "Batches", "Setup", "setup", "train_and_evaluate",
]

log = logging.getLogger(__name__)
AXIS = "data"


class Method(NamedTuple):
  """What a training method adds to the plain loop.

  Attributes:
    name: for logs and results.
    loss_terms: each ``term(out, batch, rng) -> (scalar, metrics dict)``, with
      ``out`` the model's output dict; added to the task loss.
    transforms: optax transformations put in front of the optimiser in the
      chain (they receive ``obj_fn`` and ``params``).
    embedding_hook: ``hook(rng) -> ((z, presence) -> (z, presence))``, applied
      in training forward passes only.
  """
  name: str
  loss_terms: tuple = ()
  transforms: tuple = ()
  embedding_hook: Callable | None = None


PLAIN = Method("plain")


class NonFiniteError(FloatingPointError):
  """Training met a non-finite loss or gradient and was told to stop."""


# ------------------------------------------------------------------ setup ----

def load_data(config: ml_collections.ConfigDict) -> data_lib.MultimodalDataset:
  """The data set a config names."""
  d = config.data
  if d.name == "synthetic":
    s = d.synthetic.to_dict()
    s["dominant"] = s["dominant"] or None
    return data_lib.load_dataset("synthetic", seed=config.seed, **s)
  if d.name == "mfeat":
    return data_lib.load_dataset("mfeat", root=d.root or None, seed=d.split_seed)
  return data_lib.load_dataset(d.name, path=d.path)


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.MultimodalDataset,
                seed: int | None = None) -> MultimodalModel:
  m = config.model
  return MultimodalModel(
      dataset.splits["train"].shapes(), dataset.task, dataset.num_outputs,
      hidden=m.hidden, encoder_layers=m.encoder_layers, fusion_layers=m.fusion_layers,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
      property_vectors=m.property_vectors, reconstruction=m.reconstruction,
      rngs=nnx.Rngs(config.seed if seed is None else seed))


def make_optimizer(config: ml_collections.ConfigDict,
                   extra: Sequence[optax.GradientTransformation] = ()
                   ) -> optax.GradientTransformationExtraArgs:
  """``chain(*extra, clip, adamw(schedule))`` from ``config.optim``."""
  o, steps = config.optim, config.train.steps
  if o.schedule == "cosine":
    warmup = min(o.warmup_steps, max(steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, max(steps, warmup + 1),
                                            end_value=0.1 * o.learning_rate)
  else:
    lr = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  parts = list(extra)
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(lr, weight_decay=o.weight_decay))
  return optax.chain(*parts)


# ------------------------------------------------------------- pure steps ----

def task_loss(task: str, outputs: jax.Array, labels: jax.Array,
              regression_loss: str = "l1") -> jax.Array:
  """Mean task loss: L1 / MSE, softmax cross-entropy, or per-label 2-way CE."""
  if task == "regression":
    err = outputs - labels
    return jnp.mean(jnp.abs(err)) if regression_loss == "l1" else jnp.mean(err ** 2)
  # classification (B, C) vs (B,), or multi-label (B, C, 2) vs (B, C)
  return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def make_loss_fn(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, task: str,
                 method: Method = PLAIN) -> Callable:
  """``loss_fn(params, batch, rng) -> (loss, metrics)`` for training."""
  mu = config.method.reconstruction_weight
  regression_loss = config.train.regression_loss

  def loss_fn(params, batch, rng):
    model = nnx.merge(graphdef, params)
    k_drop, k_hook, k_terms = jax.random.split(rng, 3)
    hook = method.embedding_hook(k_hook) if method.embedding_hook else None
    out = model(batch["inputs"], batch["masks"], batch["presence"], train=True,
                rngs=nnx.Rngs(dropout=k_drop), embedding_hook=hook)
    loss = task_loss(task, out["outputs"], batch["labels"], regression_loss)
    metrics = {"task_loss": loss}
    if "reconstructions" in out:
      present = out["presence"].astype(out["embeddings"].dtype)
      err = jnp.mean((out["reconstructions"]
                      - jax.lax.stop_gradient(out["embeddings"])) ** 2, -1)
      recon = jnp.sum(err * present) / jnp.maximum(jnp.sum(present), 1.0)
      metrics["recon_loss"] = recon
      loss = loss + mu * recon
    for i, term in enumerate(method.loss_terms):
      value, term_metrics = term(out, batch, jax.random.fold_in(k_terms, i))
      loss = loss + value
      metrics.update(term_metrics)
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                    axis_name: str | None = None) -> Callable:
  """``step(params, opt_state, batch, rng) -> (params, opt_state, metrics)``.

  With ``axis_name`` (inside ``shard_map``) the objective is the device mean
  of the local losses, ``lax.pmean(loss_fn(...), axis_name)``, and that is what
  is differentiated: with replicated params ``shard_map`` sums the per-device
  cotangents, so the gradient is exactly the global-batch mean gradient (a
  ``pmean`` of local gradients on top would count it N times). Metrics are
  averaged the same way, and ``obj_fn`` (for curvature transformations) is the
  same global objective. The dropout / intervention key is folded with the
  device index so devices draw different masks.
  """

  def step(params, opt_state, batch, rng):
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def objective(p):
      loss, metrics = loss_fn(p, batch, rng)
      if axis_name is not None:
        loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    obj_fn = lambda p: objective(p)[0]

    def apply(_):
      updates, new_opt_state = optimizer.update(grads, opt_state, params, obj_fn=obj_fn)
      return optax.apply_updates(params, updates), new_opt_state

    # lax.cond rather than a per-leaf select: same result, half the XLA
    # compile time on CPU (one select kernel per leaf of params and state).
    finite = _all_finite((loss, grads))
    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda _: (params, opt_state),
                                             None)
    metrics = dict(metrics, nonfinite=1.0 - finite.astype(jnp.float32),
                   grad_norm=optax.tree.norm(grads))
    return new_params, new_opt_state, metrics

  return step


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over ``num_devices`` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices, have {len(devices)}")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def make_parallel_step(loss_fn: Callable, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> Callable:
  """The data-parallel step: ``jit(shard_map(step))`` over the mesh axis ``data``.

  Params, optimiser state and the key are replicated; every leaf of the batch
  is split along its first axis.
  """
  step = make_train_step(loss_fn, optimizer, axis_name=AXIS)
  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P()),
                          out_specs=(P(), P(), P()))
  return jax.jit(sharded, donate_argnums=(0, 1))


def device_batch(batch: dict) -> dict:
  """The arrays of a host batch that the step consumes (no sample index)."""
  return {k: v for k, v in batch.items() if k != "index"}


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Places a *global* host batch on the mesh, split along the batch axis.

  With several processes each one passes the same global batch and
  contributes only its own contiguous rows
  (``jax.make_array_from_process_local_data``).
  """
  sharding = NamedSharding(mesh, P(AXIS))
  n_proc, pid = jax.process_count(), jax.process_index()
  if n_proc == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    rows = x.shape[0] // n_proc
    return jax.make_array_from_process_local_data(sharding, x[pid * rows:(pid + 1) * rows],
                                                  x.shape)
  return jax.tree.map(put, batch)


def make_predict_fn(graphdef: nnx.GraphDef) -> Callable:
  """``predict(params, batch) -> outputs`` (jitted, evaluation mode)."""
  @jax.jit
  def predict(params, batch):
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], batch["masks"], batch["presence"])["outputs"]
  return predict


def _local(tree):
  """Host copies of replicated (possibly multi-process) arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                      if isinstance(x, jax.Array) else x, tree)


# ------------------------------------------------------------ checkpoints ----

def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(tree, template):
  return jax.tree.map(lambda x, t: jax.random.wrap_key_data(x) if _is_key(t) else x,
                      tree, template)


class Checkpointer:
  """Orbax ``CheckpointManager`` for params, optimiser state and the base PRNG key,
  with JSON metadata (step, data position ``(epoch, batch)``, counters).

  :meth:`restore_latest` walks back from the newest step until one restores,
  so a checkpoint that was cut off or corrupted costs only the steps since the
  one before it; it never deletes anything.
  """

  def __init__(self, directory: str, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))

  def save(self, step: int, params, opt_state, rng, meta: dict) -> None:
    tree = {"params": params, "opt_state": _keys_to_data(opt_state),
            "rng": jax.random.key_data(rng)}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, params, opt_state, rng):
    """``(step, params, opt_state, rng, meta)`` of the newest good checkpoint, or None."""
    template = {"params": params, "opt_state": _keys_to_data(opt_state),
                "rng": jax.random.key_data(rng)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure means: try an older one
        log.warning("checkpoint %s/%s does not restore (%s: %s); trying an older one",
                    self.directory, step, type(e).__name__, e)
        continue
      state = restored.state
      return (step, state["params"], _data_to_keys(state["opt_state"], opt_state),
              jax.random.wrap_key_data(state["rng"]), dict(restored.meta))
    if self.manager.all_steps():
      raise RuntimeError(f"{self.directory}: no checkpoint restores (steps "
                         f"{sorted(self.manager.all_steps())}); move the directory away "
                         "to start afresh")
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ------------------------------------------------------------------- loop ----

class Batches:
  """Global batch for step ``s``: epoch ``s // spe``, batch ``s % spe``."""

  def __init__(self, split: data_lib.MultimodalSplit, batch_size: int, seed: int):
    if batch_size > split.num_samples:
      raise ValueError(f"train.batch_size {batch_size} exceeds the {split.num_samples} "
                       "training samples")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.per_epoch = split.num_samples // batch_size
    self._epoch, self._order = None, None

  def position(self, step: int) -> tuple[int, int]:
    return divmod(step, self.per_epoch)

  def __call__(self, step: int) -> dict:
    epoch, b = self.position(step)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = self.split.batch_indices(self.batch_size, seed=self.seed, epoch=epoch,
                                             drop_remainder=True)
    return device_batch(self.split.batch(self._order[b]))


class Setup(NamedTuple):
  """Everything a training loop needs, built from a config (see :func:`setup`)."""
  dataset: data_lib.MultimodalDataset
  graphdef: nnx.GraphDef
  params: Any
  opt_state: Any
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  step_fn: Callable
  batches: "Batches"


def setup(config: ml_collections.ConfigDict, method: Method = PLAIN, *,
          optimizer: optax.GradientTransformation | None = None,
          num_devices: int | None = None,
          dataset: data_lib.MultimodalDataset | None = None) -> Setup:
  """Data, model split into ``(graphdef, params)``, optimiser, mesh and the
  data-parallel step, with params and optimiser state replicated on the mesh.

  ``optimizer`` defaults to :func:`make_optimizer` with the method's
  transforms; ``num_devices`` to ``config.train.num_devices``.
  """
  dataset = dataset or load_data(config)
  mesh = make_mesh(config.train.num_devices if num_devices is None else num_devices)
  if config.train.batch_size % mesh.devices.size:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                     f"the {mesh.devices.size} devices")
  graphdef, params = nnx.split(build_model(config, dataset))
  optimizer = optimizer or make_optimizer(config, method.transforms)
  params, opt_state = jax.device_put((params, optimizer.init(params)),
                                     NamedSharding(mesh, P()))
  step_fn = make_parallel_step(make_loss_fn(graphdef, config, dataset.task, method),
                               optimizer, mesh)
  batches = Batches(dataset.splits["train"], config.train.batch_size, config.seed)
  return Setup(dataset, graphdef, params, opt_state, optimizer, mesh, step_fn, batches)


def _jsonable(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items()}


def evaluate_split(predict, params, split, batch_size) -> dict:
  """Metrics of ``split`` with every modality present."""
  result = protocol.evaluate(lambda b: predict(params, device_batch(b)), split,
                             [protocol.full()], batch_size=batch_size)
  return result.get("full")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: Method = PLAIN) -> dict[str, Any]:
  """Trains, checkpoints, resumes and evaluates under the protocol.

  Writes into ``workdir``: ``config.json``, ``metrics.jsonl`` (train and
  validation logs), ``checkpoints/``, and at the end ``results.md`` /
  ``results.json`` (the missing-modality table with its provenance) and
  ``results.png`` (the headline metric per condition). Returns
  the summary dict written to ``results.json`` (``"stopped": True`` when
  ``train.stop_after`` ended the run early).
  """
  validate_config(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  dataset = load_data(config)  # loaded here to warn before the model is built
  for split, counts in dataset.meta.get("nonfinite", {}).items():
    if sum(counts.values()) and is_main:
      log.warning("%s: replaced non-finite values: %s", split, counts)
  run = setup(config, method, dataset=dataset)
  graphdef, params, opt_state, mesh = run.graphdef, run.params, run.opt_state, run.mesh
  step_fn, batches, n_dev = run.step_fn, run.batches, mesh.devices.size
  predict = make_predict_fn(graphdef)
  base_rng = jax.random.key(config.seed)

  ckpt = (Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint.max_to_keep)
          if config.checkpoint.enabled else None)
  start, skipped_total, train_seconds = 0, 0, 0.0
  if ckpt is not None:
    restored = ckpt.restore_latest(params, opt_state, base_rng)
    if restored is not None:
      start, params, opt_state, base_rng, meta = restored
      skipped_total = int(meta.get("nonfinite_skipped", 0))
      train_seconds = float(meta.get("train_seconds", 0.0))
      if is_main:
        log.info("resumed from %s at step %d", ckpt.directory, start)

  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  log_file = open(os.path.join(workdir, "metrics.jsonl"), "a") if is_main else None

  def write_log(record):
    if log_file is not None:
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()

  if start:  # records after this line supersede earlier ones with a larger step
    write_log({"event": "resume", "step": start})

  def save(step):
    if ckpt is None:
      return
    epoch, b = batches.position(step)
    ckpt.save(step, params, opt_state, base_rng, {"step": step, "epoch": epoch, "batch": b,
                                        "nonfinite_skipped": skipped_total,
                                        "train_seconds": train_seconds})

  steps = config.train.steps
  stop_after = config.train.stop_after
  bar = tqdm(total=steps, initial=start, disable=not is_main, desc="train", unit="step",
             dynamic_ncols=True)
  consecutive, first_step_seconds, stopped = 0, None, False
  t_loop = time.perf_counter()
  try:
    for step in range(start, steps):
      t0 = time.perf_counter()
      batch = shard_batch(batches(step), mesh)
      params, opt_state, metrics = step_fn(params, opt_state, batch,
                                           jax.random.fold_in(base_rng, step))
      nonfinite = bool(_local(metrics["nonfinite"]) > 0)
      if first_step_seconds is None:
        first_step_seconds = time.perf_counter() - t0
      if nonfinite:
        skipped_total += 1
        consecutive += 1
        message = (f"non-finite loss or gradient at step {step} (loss "
                   f"{float(_local(metrics['loss']))}); the update was not applied")
        if config.train.on_nonfinite == "stop":
          raise NonFiniteError(message + "; stopping (train.on_nonfinite='stop')")
        if consecutive >= config.train.max_nonfinite:
          raise NonFiniteError(message + f"; {consecutive} such steps in a row "
                               f"(train.max_nonfinite={config.train.max_nonfinite})")
        log.warning(message + "; skipped")
      else:
        consecutive = 0
      done = step + 1
      bar.update(1)
      if done % config.train.log_every == 0 or done == steps:
        values = _jsonable(_local(metrics))
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        write_log({"step": done, "split": "train", **values,
                   "nonfinite_skipped": skipped_total})
      if config.train.eval_every and done % config.train.eval_every == 0 and done < steps:
        values = evaluate_split(predict, _local(params), dataset.splits["valid"],
                                config.eval.batch_size)
        write_log({"step": done, "split": "valid", **values})
      if ckpt is not None and (done % config.checkpoint.every == 0 or done == steps
                               or done == stop_after):
        train_seconds += time.perf_counter() - t_loop
        t_loop = time.perf_counter()
        save(done)
      if stop_after and done == stop_after and done < steps:
        stopped = True
        break
  finally:
    bar.close()
    if ckpt is not None:
      ckpt.close()
    if log_file is not None:
      log_file.close()
  train_seconds += time.perf_counter() - t_loop

  summary: dict[str, Any] = {
      "method": method.name, "dataset": dataset.name, "task": dataset.task,
      "steps": steps, "start_step": start, "stopped": stopped,
      "nonfinite_skipped": skipped_total, "devices": n_dev,
      "processes": jax.process_count(), "first_step_seconds": first_step_seconds,
      "train_seconds": train_seconds,
      "config": json.loads(config.to_json_best_effort()),
  }
  final_params = _local(params)
  summary["final_params"] = final_params
  if stopped:
    return summary

  split = dataset.splits[config.eval.split]
  conditions = [protocol.full()] + protocol.REMOVALS[config.eval.removals](
      dataset.modality_names)
  conditions += [protocol.random_missing(r) for r in config.eval.missing_rates]
  conditions += [protocol.frame_missing(r) for r in config.eval.frame_rates]
  conditions += [protocol.gaussian_noise(s) for s in config.eval.snrs_db]
  result = protocol.evaluate(lambda b: predict(final_params, device_batch(b)), split,
                             conditions, batch_size=config.eval.batch_size,
                             seed=config.eval.seed,
                             progress=lambda it: tqdm(it, desc="protocol", unit="condition",
                                                      disable=not is_main, dynamic_ncols=True))
  headline = HEADLINE[dataset.task]
  summary["valid"] = evaluate_split(predict, final_params, dataset.splits["valid"],
                                    config.eval.batch_size)
  summary["protocol"] = result.to_dict()
  summary["headline_metric"] = headline
  record = {k: v for k, v in summary.items() if k != "final_params"}
  record["provenance"] = provenance(seed=config.seed, eval_seed=config.eval.seed)
  if is_main:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(record, f, indent=2, default=float)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(render_results(record, result))
    plot_protocol(result, headline, os.path.join(workdir, "results.png"),
                  title=f"{method.name} on {dataset.name}, {config.eval.split} split")
  summary["table"] = result
  return summary


def render_results(record: dict, result: protocol.ProtocolResult) -> str:
  """The markdown report: what ran, where, and the protocol table."""
  prov = record["provenance"]
  cfg = record["config"]
  lines = [
      f"# {record['method']} on {record['dataset']} ({record['task']}), "
      f"{cfg['eval']['split']} split",
      "",
      f"- command: `{prov['command']}`",
      f"- commit: {prov['commit']}{' (dirty)' if prov['dirty'] else ''}",
      f"- machine: {prov['machine']['platform']}, {prov['machine']['cpu_count']} cores, "
      f"{record['devices']} device(s) x {record['processes']} process(es), "
      f"jax {prov['versions'].get('jax')}",
      f"- seeds: model/data {cfg['seed']}, protocol {cfg['eval']['seed']}",
      f"- training: {record['steps']} steps, batch {cfg['train']['batch_size']}, "
      f"{record['train_seconds']:.1f} s, {record['nonfinite_skipped']} non-finite steps skipped",
      "",
      result.to_markdown(digits=4),
      "",
  ]
  return "\n".join(lines)
