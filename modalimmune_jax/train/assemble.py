"""Everything a training loop needs, built from a config: :func:`setup`.

Example:
  >>> run = setup(config)                                  # the configured method
  >>> state, metrics = run.step_fn(run.state, shard_batch(run.batches(0), run.mesh),
  ...                              jax.random.key(0))
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from modalimmune_jax import build
from modalimmune_jax import data as data_lib
from modalimmune_jax import methods as methods_lib
from modalimmune_jax.methods.base import Method, ModelFns, compute_in
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.step import (StepFn, TrainState, device_batch, init_state,
                                  make_loop_step, make_mesh, make_parallel_periodic,
                                  make_parallel_step)

__all__ = ["build_model", "Batches", "Setup", "setup", "max_nonfinite", "make_predict_fn",
           "compute_dtype"]


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.MultimodalDataset,
                seed: int | None = None) -> MultimodalModel:
  """The model the configured method trains: :func:`modalimmune_jax.build.build_model`
  with the method's model parts (its spec's ``model_parts``, e.g. CMPT's proxy
  tokens, LoRA and gate)."""
  return build.build_model(config, dataset, seed, parts=methods_lib.model_parts(config))


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

  def _indices(self, step: int) -> np.ndarray:
    epoch, b = self.position(step)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = self.split.batch_indices(self.batch_size, seed=self.seed, epoch=epoch,
                                             drop_remainder=True)
    return self._order[b]

  def indices(self, step: int, k: int = 1) -> np.ndarray:
    """``(k, batch_size)`` sample indices of steps ``step .. step + k - 1``."""
    return np.stack([self._indices(s) for s in range(step, step + k)]).astype(np.int32)

  def __call__(self, step: int) -> dict:
    """The host batch of ``step`` (what the device-resident pipeline gathers)."""
    return device_batch(self.split.batch(self._indices(step)))


class Setup(NamedTuple):
  """Everything a training loop needs, built from a config (see :func:`setup`).

  ``step_fn(state, batch, rng, step=None)`` takes a host batch
  (``shard_batch``) and runs the method's periodic programs around the step
  (:class:`~modalimmune_jax.step.StepFn`); ``loop_fn(state, data, indices,
  base_rng)`` is the loop's form (:func:`~modalimmune_jax.step.make_loop_step`):
  ``k`` steps per call on the device-resident split, and ``loop_periodic``
  the periodic programs in that form (``(Periodic, fn)`` pairs, indices of one
  step). All compile on first use.
  """
  dataset: data_lib.MultimodalDataset
  model: ModelFns
  method: Method
  state: TrainState
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  step_fn: Callable
  batches: Batches
  loop_fn: Callable
  loop_periodic: tuple = ()

  @property
  def graphdef(self):
    return self.model.graphdef


def max_nonfinite(config: ml_collections.ConfigDict) -> int:
  """Bad steps in a row after which the step halts (1 with ``on_nonfinite='stop'``)."""
  t = config.train
  return 1 if t.on_nonfinite == "stop" else t.max_nonfinite


def setup(config: ml_collections.ConfigDict,
          method: Method | Callable[[ModelFns], Method] | None = None, *,
          optimizer: optax.GradientTransformation | None = None,
          num_devices: int | None = None,
          dataset: data_lib.MultimodalDataset | None = None,
          model: nnx.Module | None = None) -> Setup:
  """Data, model, method, optimiser, mesh, the replicated train state and the
  data-parallel step.

  ``method`` defaults to the one ``config.method.name`` names; a callable
  ``model_fns -> Method`` builds a custom one. ``optimizer`` defaults to
  :func:`~modalimmune_jax.build.make_optimizer`; the method's transforms are
  put in front of it either way (and its ``post_transforms`` after it).
  ``num_devices`` defaults to ``config.train.num_devices``. ``model`` replaces
  the configured model (any NNX module with ``MultimodalModel``'s call). A given
  ``dataset`` is seen as the config's run sees it
  (:func:`~modalimmune_jax.build.training_view`, ``train.present``).
  """
  dataset = (build.load_data(config) if dataset is None
             else build.training_view(config, dataset))
  mesh = make_mesh(config.train.num_devices if num_devices is None else num_devices)
  if config.train.batch_size % mesh.devices.size:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                     f"the {mesh.devices.size} devices")
  graphdef, params = nnx.split(model if model is not None else build_model(config, dataset))
  fns = ModelFns(graphdef, dataset.modality_names, dataset.task, config.train.regression_loss,
                 compute_dtype(config))
  if method is None:
    method = methods_lib.from_config(config, fns, dataset)
  elif not isinstance(method, Method):
    method = method(fns)
  optimizer = (build.make_optimizer(config, method.transforms) if optimizer is None
               else optax.chain(*method.transforms, optimizer))
  if method.post_transforms:
    optimizer = optax.chain(optimizer, *method.post_transforms)
  state = jax.device_put(init_state(params, optimizer, method), NamedSharding(mesh, P()))
  max_bad = max_nonfinite(config)
  step_fn = StepFn(make_parallel_step(method, optimizer, mesh, max_bad),
                   [(p, make_parallel_periodic(method, p, mesh, max_bad))
                    for p in method.periodic])
  loop_fn = make_loop_step(method, optimizer, mesh, max_bad)
  loop_periodic = tuple((p, make_parallel_periodic(method, p, mesh, max_bad, on_device="single"))
                        for p in method.periodic)
  batches = Batches(dataset.splits["train"], config.train.batch_size, config.seed)
  return Setup(dataset, fns, method, state, optimizer, mesh, step_fn, batches, loop_fn,
               loop_periodic)


def make_predict_fn(graphdef: nnx.GraphDef, predict_hook: Callable | None = None,
                    compute_dtype=None) -> Callable:
  """``predict(params, batch, method_state=None) -> outputs`` (jitted, evaluation
  mode, in ``compute_dtype`` as training computes; outputs in float32). With a
  method's ``predict_hook`` (``Method.predict_hook``) the model runs with the
  hook ``predict_hook(params, method_state)`` (EBR's test-time fill)."""
  @jax.jit
  def predict(params, batch, method_state=None):
    hook = None if predict_hook is None else predict_hook(params, method_state)
    return compute_in(compute_dtype, graphdef, params, batch,
                      embedding_hook=hook)["outputs"]
  return predict


def compute_dtype(config: ml_collections.ConfigDict):
  """``train.compute_dtype`` as a dtype (None for float32: the parameters' own)."""
  return None if config.train.compute_dtype == "float32" else jnp.dtype(
      config.train.compute_dtype)
