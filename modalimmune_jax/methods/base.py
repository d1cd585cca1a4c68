"""The method plug-in: what a training method is, and the model it trains.

A :class:`Method` is a small NamedTuple of pure functions, in the style of an
``optax.GradientTransformation``:

* ``init(params) -> method_state``: any pytree (controller statistics,
  meta-parameters and their optimiser state, fixed batches, ...);
* ``loss(params, method_state, batch, rng, axis_name) -> (loss, destructive,
  metrics)``: the training objective of one (local) batch. ``destructive`` is
  the part of ``loss`` whose gradient a curvature mask may damp (0 for
  methods without one); the loss may run any number of forward passes;
* ``update(method_state, params, batch, rng, step, axis_name) ->
  (method_state, metrics)``: runs inside the jitted step after the parameter
  update, every step;
* ``periodic``: :class:`Periodic` work (every ``every`` steps), each run by
  the loop as its own compiled program before or after the step it fires
  at, so that the step itself costs nothing for it on the other steps;
* ``transforms``: optax transformations put in front of the optimiser;
* ``post_transforms``: optax transformations put after it (on the final
  updates: e.g. zeroing a frozen parameter's update, which a transform in
  front cannot do against AdamW's momentum and weight decay);
* ``split_destructive``: the step passes the gradient of ``destructive`` to
  the optimiser as the extra argument ``destructive``;
* ``destructive(params, method_state, batch, rng, axis_name) -> scalar``: the
  destructive part alone, when it reads only part of the model (ModalImmune's
  collapse penalty reads the encoders' outputs): the step then takes its
  gradient through that part, instead of a second backward pass through the
  whole model; default None;
* ``events(step, get_metrics) -> list[dict]``: host side, records for
  ``metrics.jsonl`` (``get_metrics()`` fetches the step's metrics);
* ``objective(params, method_state, batch, rng, axis_name) -> scalar``: the
  objective whose curvature the optimiser's curvature transforms measure
  (``obj_fn``); default ``loss - destructive``;
* ``faults(old_state, new_state) -> {term: bool}``: which of the method's
  statistics went non-finite in this step's ``update`` (the step then
  applies nothing and counts it); default: each field of a NamedTuple
  state with floating leaves, checked for finiteness;
* ``predict_hook(params, method_state) -> hook``: the ``embedding_hook`` that
  evaluation runs the model with (:func:`modalimmune_jax.train.make_predict_fn`),
  for a method whose prediction needs its state (EBR's test-time fill);
  default None: the model alone.

The train step (:mod:`modalimmune_jax.step`) carries one
:class:`~modalimmune_jax.step.TrainState` (step, params, optimiser state,
method state) and never looks at a method's name. Inside ``shard_map`` the
loss sees the local rows of the global batch; ``axis_name`` is the mesh axis,
and ``rng`` is the same on every device (use :func:`local_rows` for
per-sample draws, so that N devices draw exactly what 1 device draws).

A method module also declares a :class:`MethodSpec`: its name, its settings
(the config section ``config.method.<name>``, each key with its rule and
source), how it is built from a config, its tuning trials for ``compare`` and
the model parts it needs; :mod:`modalimmune_jax.methods` finds it by name.
``docs/method.md`` ("Writing a method") has the contract in full and a complete
example, run by the tests.

Example (a method that adds an L2 penalty on the fused representation; the
reconstruction loss trains the model's generator, as every method's does):

  >>> def l2_fused(model, weight, reconstruction_weight=1.0):
  ...   def loss(params, state, batch, rng, axis_name=None):
  ...     out = model.apply(params, batch, rng, axis_name=axis_name)
  ...     task = model.task_loss(out["outputs"], batch["labels"])
  ...     recon = reconstruction_loss(out, batch["presence"], axis_name)
  ...     extra = weight * jnp.mean(out["fused"] ** 2)
  ...     total = task + reconstruction_weight * recon + extra
  ...     return total, 0.0, {"task_loss": task, "recon_loss": recon}
  ...   return Method("l2_fused", init=lambda params: (), loss=loss)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from modalimmune_jax.finite import all_finite, has_floats

__all__ = ["Method", "Periodic", "MethodSpec", "NoSettings", "ModelFns", "compute_in",
           "task_loss", "cell_mean",
           "reconstruction_loss", "global_batch_size", "has_floats", "all_finite",
           "local_rows", "no_update"]


def no_update(state, params, batch, rng, step, axis_name=None):
  """The ``update`` of a method whose state never changes."""
  return state, {}


class Method(NamedTuple):
  """A training method (see the module docstring for each field's contract)."""
  name: str
  init: Callable[[Any], Any]
  loss: Callable[..., tuple[jax.Array, jax.Array, dict]]
  update: Callable[..., tuple[Any, dict]] = no_update
  transforms: tuple = ()
  split_destructive: bool = False
  events: Callable[[int, Callable[[], dict]], list] | None = None
  objective: Callable[..., jax.Array] | None = None
  faults: Callable[[Any, Any], dict] | None = None
  predict_hook: Callable[[Any, Any], Callable] | None = None
  post_transforms: tuple = ()
  periodic: tuple = ()
  destructive: Callable[..., jax.Array] | None = None


class Periodic(NamedTuple):
  """Work a method does every ``every`` steps, compiled as its own program.

  The training loop runs ``fn`` around step ``s`` when ``s % every == phase``:
  before the step (``before=True``, on the parameters the step starts from)
  or after it (on the updated parameters), with the step's batch and key.
  Inside a ``lax.cond`` of the step the work would cost on every step: the
  step's program would carry its operands, buffers and temporaries (XLA CPU
  allocates the largest branch's temporaries on every call).

  ``fn(params, opt_state, method_state, batch, rng, step, axis_name) ->
  (opt_state, method_state, metrics)``: ``step`` is ``s``; ``metrics`` (a dict
  of scalars) replace the step's metrics of the same names for step ``s``.
  A non-finite result (``Method.faults`` of the method state, or a
  non-finite optimiser state) is not applied and is counted like a skipped
  step. With ``train.steps_per_dispatch = k > 1`` the work runs before or
  after the dispatch of ``k`` steps that contains ``s``.

  Example (the controller of ModalImmune, every 10 steps after the update):
    >>> Periodic(10, measure)            # measure(params, opt_state, ms, batch, ...)
  """
  every: int
  fn: Callable[..., tuple[Any, Any, dict]]
  phase: int = 0
  before: bool = False

  def fires(self, step: int) -> bool:
    """Whether the work runs around step ``step``."""
    return step % self.every == self.phase


class NoSettings(NamedTuple):
  """The settings of a method that has none (no config section)."""


class MethodSpec(NamedTuple):
  """How a method is found by name and built from a config: one per method
  module, registered with :func:`modalimmune_jax.methods.register`.

  Attributes:
    name: ``config.method.name``; the settings live in ``config.method.<name>``.
    settings: a ``NamedTuple`` whose fields are exactly the keys of that
      section, each ``Annotated[type, schema.Key(doc, ...)]`` with its rule
      and source (:mod:`modalimmune_jax.schema`); the section, its validation
      and ``experiments/configs/METHODS.md`` derive from it. A method without
      settings leaves the empty default.
    build: ``build(settings, config, model, dataset) -> Method``; may raise
      :class:`~modalimmune_jax.schema.ConfigError` for settings that do not fit
      the data (naming the key), before anything compiles. ``dataset`` is the
      one the run sees (with ``train.present``, its train and valid splits lack
      the other modalities), so batches a method draws from it lack them too.
    search: ``compare``'s tuning trials, each a dict of dotted config
      overrides (every built-in method has 3).
    model_parts: ``settings -> dict`` of extra
      :class:`~modalimmune_jax.model.MultimodalModel` arguments the method
      needs (CMPT's proxy tokens, LoRA, gate); None for none.
    validate: ``settings -> None``, checks across keys (``ConfigError``).
    label: how tables mark the method (``"reimpl., no official code"``).
    about: the paragraph ``METHODS.md`` prints above the method's table.
    search_docs: ``{key: source}`` of tuned keys outside the method's section.
    ablations: ``{row label: overrides}``, the rows of ``compare --ablation``.
  """
  name: str
  build: Callable[..., Method]
  settings: type = NoSettings
  search: tuple = ()
  model_parts: Callable[[Any], dict] | None = None
  validate: Callable[[Any], None] | None = None
  label: str = ""
  about: str = ""
  search_docs: dict = {}
  ablations: dict = {}


def task_loss(task: str, outputs: jax.Array, labels: jax.Array,
              regression_loss: str = "l1") -> jax.Array:
  """Mean task loss: L1 / MSE, softmax cross-entropy, or per-label 2-way CE."""
  if task == "regression":
    err = outputs - labels
    return jnp.mean(jnp.abs(err)) if regression_loss == "l1" else jnp.mean(err ** 2)
  # classification (B, C) vs (B,), or multi-label (B, C, 2) vs (B, C)
  return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def cell_mean(values: jax.Array, weights: jax.Array,
              axis_name: str | None = None) -> jax.Array:
  """``sum(values * weights) / count`` with ``count = sum(weights)``; 0 when
  nothing counts.

  The mean over the (sample, modality) cells a loss term covers. With
  ``axis_name`` (inside ``shard_map``) ``count`` is the device mean of the
  counts, so the step's ``pmean`` of the result is the global-batch mean even
  when the devices hold different numbers of counted cells (random removals).

  Example:
    >>> cell_mean(jnp.array([1.0, 3.0, 5.0]), jnp.array([True, True, False]))  # 2.0
  """
  w = weights.astype(values.dtype)
  count = jnp.sum(w)
  if axis_name is not None:
    count = jax.lax.pmean(count, axis_name)
  return jnp.sum(values * w) / jnp.where(count > 0, count, 1.0)


def reconstruction_loss(out: dict, present: jax.Array,
                        axis_name: str | None = None) -> jax.Array:
  """Mean over present (sample, modality) cells of ``||r_m - sg(z_m)||^2 / k``.

  ``out`` is the model's output (``reconstructions``, ``embeddings``); 0 when
  the model has no reconstruction generator. With ``axis_name`` (inside
  ``shard_map``) the denominator is the device mean of the cell counts, so the
  step's ``pmean`` is the global-batch mean even when the devices hold
  different numbers of present cells (random removals); without it, each
  device's own count (:func:`cell_mean`).
  """
  if "reconstructions" not in out:
    return jnp.zeros([], out["outputs"].dtype)
  err = jnp.mean((out["reconstructions"] - jax.lax.stop_gradient(out["embeddings"])) ** 2, -1)
  return cell_mean(err, present, axis_name)


def global_batch_size(batch: dict, axis_name: str | None) -> int:
  """Rows of the global batch: the local rows times the devices on ``axis_name``."""
  rows = batch["presence"].shape[0]
  return rows if axis_name is None else rows * jax.lax.axis_size(axis_name)


def local_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's rows of an array drawn for the *global* batch.

  Outside ``shard_map`` (``axis_name=None``) ``x`` itself. Inside, the global
  batch is split in equal contiguous shards along the mesh axis, so device
  ``i`` of ``n`` takes rows ``[i * B / n, (i + 1) * B / n)``.
  """
  if axis_name is None:
    return x
  n = jax.lax.axis_size(axis_name)
  rows = x.shape[0] // n
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis_name) * rows, rows)


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x),
                                                                   jnp.floating) else x, tree)


def compute_in(dtype, graphdef: nnx.GraphDef, params, batch: dict, embed_only: bool = False,
               **call) -> dict:
  """``MultimodalModel.__call__`` of ``(graphdef, params)`` on ``batch``, computed
  in ``dtype`` (None: as the parameters are): the floating parameters and
  inputs are cast to it, and the floating outputs back to float32, so losses,
  spectra and metrics stay in float32 and the gradients reach the float32
  parameters through the casts (mixed precision). ``embed_only``: the
  encoders alone (``MultimodalModel.encode``), their embeddings returned.

  Example:
    >>> out = compute_in(jnp.bfloat16, graphdef, params, batch, train=False)
  """
  if dtype is not None:
    params, batch = _cast_floats(params, dtype), dict(batch, inputs=_cast_floats(
        batch["inputs"], dtype))
  model = nnx.merge(graphdef, params)
  if embed_only:
    out = model.encode(batch["inputs"], batch["masks"], **call)[1]
  else:
    out = model(batch["inputs"], batch["masks"], batch["presence"], **call)
  return out if dtype is None else _cast_floats(out, jnp.float32)


def _dropout_rngs(rng: jax.Array | None, axis_name: str | None):
  """The model's dropout stream from ``rng`` (None: no dropout); inside
  ``shard_map`` folded with the device index, so devices draw different masks."""
  if rng is None:
    return None
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return nnx.Rngs(dropout=rng)


class ModelFns(NamedTuple):
  """The NNX model as pure functions of its parameters (``nnx.State``).

  Attributes:
    graphdef: from ``nnx.split(model)``.
    names: modality order (the columns of ``presence``).
    task: ``"regression"``, ``"classification"`` or ``"multilabel"``.
    regression_loss: ``"l1"`` or ``"mse"``.
    compute_dtype: the model's compute dtype (e.g. ``jnp.bfloat16``) with
      float32 parameters and optimiser state; None = the parameters' own
      (:func:`compute_in`).
  """
  graphdef: nnx.GraphDef
  names: tuple[str, ...]
  task: str
  regression_loss: str = "l1"
  compute_dtype: Any = None

  def apply(self, params, batch: dict, rng: jax.Array | None = None, *, train: bool = True,
            hook: Callable | None = None, axis_name: str | None = None) -> dict:
    """The model's output dict (see ``MultimodalModel.__call__``).

    ``rng`` drives the model's dropout; inside ``shard_map`` it is folded with
    the device index so devices draw different dropout masks. With a
    ``compute_dtype`` the model runs in it and its outputs come back in float32.
    """
    return compute_in(self.compute_dtype, self.graphdef, params, batch, train=train,
                      rngs=_dropout_rngs(rng, axis_name), embedding_hook=hook)

  def embed(self, params, batch: dict, rng: jax.Array | None = None, *, train: bool = True,
            axis_name: str | None = None) -> jax.Array:
    """The embeddings ``(B, M, k)`` alone: ``apply(...)["embeddings"]`` (the same
    dropout) without tracing the fusion, generator and head."""
    return compute_in(self.compute_dtype, self.graphdef, params, batch, embed_only=True,
                      train=train, rngs=_dropout_rngs(rng, axis_name))

  def in_float32(self) -> "ModelFns":
    """The same model computing in its parameters' dtype (float32): for what
    must stay exact (BHGD's solves and certificates)."""
    return self._replace(compute_dtype=None)

  @staticmethod
  def encoder_leaves(params):
    """A tree like ``params``, True on the encoders' leaves: the only ones
    the embeddings (``apply(...)["embeddings"]``) depend on."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[0].key == "encoders", params)

  def task_loss(self, outputs: jax.Array, labels: jax.Array) -> jax.Array:
    return task_loss(self.task, outputs, labels, self.regression_loss)
