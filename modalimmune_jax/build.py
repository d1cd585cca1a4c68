"""The data set, the model and the optimiser a config describes.

Below the methods (a method may build a second model, as distillation's
teacher, or an optimiser for its own networks) and above the model and data
layers. The training package adds the configured method's model parts
(:func:`modalimmune_jax.methods.model_parts`) when it builds the model it trains.

Example:
  >>> dataset = load_data(config)
  >>> model = build_model(config, dataset)            # plain MultimodalModel
  >>> optimizer = make_optimizer(config)              # chain(clip, adamw(schedule))
"""

from __future__ import annotations

from typing import Sequence

import ml_collections
import optax
from flax import nnx

from modalimmune_jax import data as data_lib
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.schema import ConfigError

__all__ = ["load_data", "training_view", "build_model", "make_optimizer"]


def load_data(config: ml_collections.ConfigDict) -> data_lib.MultimodalDataset:
  """The data set a config names, as its run sees it (:func:`training_view`)."""
  d = config.data
  if d.name == "synthetic":
    s = d.synthetic.to_dict()
    # ConfigDict sorts the keys of ``shapes``: the order is ``modalities``.
    shapes = s.pop("shapes")
    s["shapes"] = {m: tuple(shapes[m]) for m in s.pop("modalities")}
    seed = s.pop("seed", -1)  # -1: the run's seed (older configs)
    dataset = data_lib.load_dataset("synthetic", seed=config.seed if seed < 0 else seed, **s)
  elif d.name == "mfeat":
    dataset = data_lib.load_dataset("mfeat", root=d.root or None, seed=d.split_seed)
  else:
    dataset = data_lib.load_dataset(d.name, path=d.path)
  return training_view(config, dataset)


def training_view(config: ml_collections.ConfigDict,
                  dataset: data_lib.MultimodalDataset) -> data_lib.MultimodalDataset:
  """``dataset`` with ``config.train.present`` applied
  (:meth:`~modalimmune_jax.data.MultimodalDataset.training_view`: the train and
  valid splits lack the other modalities, test has every one); the same object
  when there is nothing to apply. Raises
  :class:`~modalimmune_jax.schema.ConfigError` naming ``train.present`` for a
  name the data set does not have."""
  present = tuple(config.train.get("present", ()))
  unknown = [m for m in present if m not in dataset.modality_names]
  if unknown:
    raise ConfigError(f"config key 'train.present' {present} names {unknown}, not modalities "
                      f"of {dataset.name} {dataset.modality_names}")
  return dataset.training_view(present)


def build_model(config: ml_collections.ConfigDict, dataset: data_lib.MultimodalDataset,
                seed: int | None = None, parts: dict | None = None,
                cls: type = MultimodalModel) -> MultimodalModel:
  """The model ``config.model`` describes for ``dataset``, initialised from
  ``seed`` (default ``config.seed``), with a method's extra ``parts`` (keyword
  arguments of :class:`~modalimmune_jax.model.MultimodalModel`); ``cls``: another
  class with its constructor (e.g. an older formulation to time against)."""
  m = config.model
  return cls(
      dataset.splits["train"].shapes(), dataset.task, dataset.num_outputs,
      hidden=m.hidden, encoder_layers=m.encoder_layers, fusion_layers=m.fusion_layers,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
      property_vectors=m.property_vectors, reconstruction=m.reconstruction,
      **(parts or {}), rngs=nnx.Rngs(config.seed if seed is None else seed))


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
