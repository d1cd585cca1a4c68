"""Evaluation during and after training: the protocol's conditions a config
asks for, a split's metrics, and model selection on the valid split."""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections

from modalimmune_jax import protocol
from modalimmune_jax.checkpoint import Checkpointer
from modalimmune_jax.metrics import HEADLINE
from modalimmune_jax.schema import ConfigError
from modalimmune_jax.step import device_batch, host_copy

__all__ = ["eval_conditions", "evaluate_split", "ValidSelector"]


def eval_conditions(config: ml_collections.ConfigDict,
                    modality_names: Sequence[str]) -> list[protocol.Condition]:
  """The protocol's conditions that ``config.eval`` asks for."""
  e = config.eval
  top = (len(modality_names) - 1) / len(modality_names)
  if any(eta > top + 1e-9 for eta in e.cell_etas):
    raise ConfigError(f"config key 'eval.cell_etas' {tuple(e.cell_etas)} must be at most "
                      f"(M-1)/M = {top:.4g} for the {len(modality_names)} modalities "
                      f"{tuple(modality_names)} (at least one kept per sample)")
  return protocol.standard_conditions(modality_names, e.missing_rates, e.frame_rates,
                                      e.snrs_db, removals=e.removals, cell_etas=e.cell_etas,
                                      sample_rates=e.sample_rates,
                                      sample_patterns=e.sample_patterns, draws=e.draws)


def evaluate_split(predict, params, split, batch_size, method_state=None) -> dict:
  """Metrics of ``split`` with every modality present."""
  result = protocol.evaluate(lambda b: predict(params, device_batch(b), method_state), split,
                             [protocol.full()], batch_size=batch_size)
  return result.get("full")


class ValidSelector:
  """Model selection on the valid split (``eval.select='valid'``).

  At every validation interval and at the end, the parameters are scored on
  the **valid** split under the same protocol conditions as the final
  evaluation (:func:`eval_conditions`, :func:`protocol.selection_score`: the
  headline metric averaged over full and every missing-modality condition);
  the best state is kept in ``WORKDIR/best/`` (one orbax checkpoint, resumable)
  and is the one evaluated on ``eval.split`` at the end. The final state stays
  in ``checkpoints/``. Ties keep the earlier step.
  """

  def __init__(self, config, dataset, predict, workdir, state, rng, eval_state):
    self.config, self.predict = config, predict
    self.split = dataset.splits["valid"]
    self.conditions = eval_conditions(config, dataset.modality_names)
    self.metric = HEADLINE[dataset.task]
    self.lower = self.metric == "MAE"
    self.rng = rng
    self.best_step, self.best_score, self.best_params = None, None, None
    self.best_method_state = None
    self.scores = {}  # step -> valid score, this session
    self.ckpt = (Checkpointer(os.path.join(workdir, "best"), 1)
                 if config.checkpoint.enabled else None)
    if self.ckpt is not None:
      restored = self.ckpt.restore_latest(state, rng)
      if restored is not None:
        self.best_step, best, _, meta = restored
        self.best_score = float(meta["valid_score"])
        self.best_params, self.best_method_state = host_copy(best.params), eval_state(best)

  def consider(self, step: int, state, params, method_state=None) -> float:
    result = protocol.evaluate(lambda b: self.predict(params, device_batch(b), method_state),
                               self.split,
                               self.conditions, batch_size=self.config.eval.batch_size,
                               seed=self.config.eval.seed)
    score = protocol.selection_score(result.to_dict(), self.metric)
    self.scores[step] = score
    better = self.best_score is None or (score < self.best_score if self.lower
                                         else score > self.best_score)
    if better:
      self.best_step, self.best_score, self.best_params = step, score, params
      self.best_method_state = method_state
      if self.ckpt is not None and step not in self.ckpt.manager.all_steps():
        self.ckpt.save(step, state, self.rng, {"step": step, "valid_score": score,
                                               "metric": self.metric})
    return score

  def summary(self) -> dict:
    return {"rule": "valid", "step": self.best_step, "valid_score": self.best_score,
            "metric": self.metric, "score": "mean over full and missing conditions",
            "scores_this_session": {str(k): v for k, v in self.scores.items()}}

  def close(self):
    if self.ckpt is not None:
      self.ckpt.close()
