"""Plain training: the task loss (plus the reconstruction loss when the model
has a generator). The trivial :class:`~modalimmune_jax.methods.base.Method`."""

from __future__ import annotations

from modalimmune_jax.methods.base import Method, MethodSpec, ModelFns, reconstruction_loss

__all__ = ["plain", "supervised_loss", "SPEC"]


def supervised_loss(model: ModelFns, params, batch, rng, reconstruction_weight,
                    axis_name=None, hook=None):
  """``(task + mu * reconstruction, metrics, out)`` of one forward pass.

  Inside ``shard_map`` the reconstruction loss divides by the device mean of
  the present-cell counts, so a batch with modalities removed (dropout,
  distillation's student) gives the global-batch mean on N devices as on one.
  """
  out = model.apply(params, batch, rng, hook=hook, axis_name=axis_name)
  task = model.task_loss(out["outputs"], batch["labels"])
  recon = reconstruction_loss(out, batch["presence"], axis_name)
  metrics = {"task_loss": task, "recon_loss": recon}
  return task + reconstruction_weight * recon, metrics, out


def plain(model: ModelFns, reconstruction_weight: float = 1.0) -> Method:
  """Plain supervised training.

  Example:
    >>> method = plain(model_fns)
    >>> loss, destructive, metrics = method.loss(params, method.init(params), batch, rng)
  """
  def loss(params, state, batch, rng, axis_name=None):
    total, metrics, _ = supervised_loss(model, params, batch, rng, reconstruction_weight,
                                        axis_name)
    return total, 0.0, metrics

  return Method("plain", init=lambda params: (), loss=loss)


def from_config(settings, config, model: ModelFns, dataset) -> Method:
  return plain(model, config.method.reconstruction_weight)


SPEC = MethodSpec(
    "plain", from_config,
    # plain's regularisation budget, so that it gets as many trials as every method
    search=({"model.dropout": 0.0, "optim.weight_decay": 1e-4},
            {"model.dropout": 0.1, "optim.weight_decay": 1e-3},
            {"model.dropout": 0.3, "optim.weight_decay": 1e-2}),
    search_docs={
        "model.dropout": "ours: plain's regularisation budget (fusion/encoder dropout), so "
                         "that plain gets the same number of trials as every method",
        "optim.weight_decay": "ours: AdamW's decay, tuned with `model.dropout` (same reason)"})
