"""One run of the training loop: its config, data, work directory, checkpoints,
log and validation selector (:class:`Run`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from modalimmune_jax.build import training_view
from modalimmune_jax.checkpoint import Checkpointer
from modalimmune_jax.schema import ConfigError
from modalimmune_jax.step import fault_names, host_copy, split_arrays
from modalimmune_jax.tensorboard import EventWriter
from modalimmune_jax.train.evaluation import ValidSelector
from modalimmune_jax.train.assemble import setup
from modalimmune_jax.train.workdir import NonFiniteError, WorkdirError, check_workdir

__all__ = ["Run", "describe_health"]

log = logging.getLogger("modalimmune_jax.train")


def describe_health(health, names: Sequence[str]) -> str:
  terms = [n for i, n in enumerate(names) if int(health.terms) >> i & 1] or ["values"]
  return f"non-finite {', '.join(terms)} at step {int(health.last_bad)}"


class Run:
  """One run of the loop (:func:`~modalimmune_jax.train.loop.train_loop`): its
  config, data, work directory, checkpoints, log and validation selector.
  Every check of the user's input happens in the constructor, before anything
  is written; :meth:`restore` then fixes the resume point and :meth:`open`
  writes the run's files."""

  def __init__(self, config, workdir, dataset, method, on_change):
    dataset = training_view(config, dataset)  # train.present (load_data applied it already)
    self.config, self.workdir, self.dataset = config, workdir, dataset
    self.is_main = jax.process_index() == 0
    for split, counts in dataset.meta.get("nonfinite", {}).items():
      if sum(counts.values()) and self.is_main:
        log.warning("%s: replaced non-finite values: %s", split, counts)
    if config.train.batch_size > dataset.splits["train"].num_samples:
      raise ConfigError(
          f"config key 'train.batch_size' ({config.train.batch_size}) exceeds the "
          f"{dataset.splits['train'].num_samples} training samples of {dataset.name}")
    self.change = check_workdir(config, workdir, on_change)
    os.makedirs(workdir, exist_ok=True)
    self.setup = setup(config, method, dataset=dataset)
    self.method = self.setup.method
    # committed to the mesh like the state, so that a restored key (which orbax
    # gives the template's sharding) makes the same program: a resume hits the
    # compilation cache instead of compiling the step again
    self.base_rng = jax.device_put(jax.random.key(config.seed),
                                   NamedSharding(self.setup.mesh, P()))
    self.names = fault_names(self.method, self.setup.state.method_state)
    self.ckpt = (Checkpointer(os.path.join(workdir, "checkpoints"),
                              config.checkpoint.max_to_keep)
                 if config.checkpoint.enabled else None)
    self.state, self.start, self.seconds_before = self.setup.state, 0, 0.0
    self.log_file, self.tb, self.selector = None, None, None
    self.reported, self.grouped = 0, False
    self.host_data = split_arrays(dataset.splits["train"])

  def eval_state(self, state):
    """The method state evaluation needs (None unless the method has a predict_hook)."""
    return host_copy(state.method_state) if self.method.predict_hook else None

  def restore(self, at_most: int | None = None) -> int:
    """Resumes from the newest good checkpoint (at most ``at_most``); the step."""
    self.state, self.start, self.seconds_before = self.setup.state, 0, 0.0
    if self.ckpt is None:
      return 0
    restored = self.ckpt.restore_latest(self.setup.state, self.base_rng, at_most=at_most)
    if restored is not None:
      self.start, self.state, self.base_rng, meta = restored
      self.seconds_before = float(meta.get("train_seconds", 0.0))
    return self.start

  def open(self, predict, grouped: bool) -> None:
    """After the resume point is fixed: checks it, writes ``config.json``, opens
    the log and the validation selector (``grouped``: trained with other seeds
    in one program, so messages name the work directory)."""
    config, workdir = self.config, self.workdir
    self.grouped = grouped
    if self.start:
      log.info("resumed %s from its checkpoint of step %d", workdir, self.start)
    if self.start > config.train.steps:
      raise WorkdirError(f"{workdir}: its checkpoint is at step {self.start}, past "
                         f"train.steps {config.train.steps}")
    if self.start % config.train.steps_per_dispatch:
      raise ConfigError(
          f"config key 'train.steps_per_dispatch' ({config.train.steps_per_dispatch}) must "
          f"divide the resumed step {self.start}")
    path = os.path.join(workdir, "config.json")
    if self.is_main and (self.change is not None or not os.path.isfile(path)):
      with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    if self.is_main:
      self.log_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
      # beside it, TensorBoard's event files; a resumed run's first step purges what
      # an earlier session logged from there on (it is logged again)
      self.tb = EventWriter(workdir, enabled=config.train.tensorboard, process_index=0,
                            purge_step=self.start or None)
    if self.start:  # records after this line supersede earlier ones with a larger step
      self.write_log({"event": "resume", "step": self.start,
                      **({"extended_to": config.train.steps} if self.change == "extended"
                         else {})})
    if config.eval.select == "valid":
      self.selector = ValidSelector(config, self.dataset, predict, workdir, self.state,
                                    self.base_rng, self.eval_state)
    self.reported = int(host_copy(self.state.health).skipped)

  def write_log(self, record: dict) -> None:
    """One record to ``metrics.jsonl`` and its numbers to TensorBoard, tagged
    ``<split or event>/<name>`` (``train/loss``, ``valid/accuracy``,
    ``hypergrad/error_bound``) at the record's step."""
    if self.log_file is not None:
      self.log_file.write(json.dumps(record) + "\n")
      self.log_file.flush()
    if self.tb is not None:
      kind = record.get("split") or record.get("event")
      self.tb.scalars(record["step"], {k: v for k, v in record.items()
                                       if k not in ("step", "split", "event")},
                      prefix=f"{kind}/")

  def check_health(self, h) -> None:
    """Stops on a halted run, warns on new skips (``h``: host ``Health``)."""
    t = self.config.train
    if h.halted:
      limit = ("train.on_nonfinite='stop'" if t.on_nonfinite == "stop"
               else f"train.max_nonfinite={t.max_nonfinite}")
      raise NonFiniteError(f"{describe_health(h, self.names)}: {int(h.run)} bad step(s) in a "
                           f"row ({limit}); stopping. No update of a bad step was applied"
                           + (f" ({self.workdir})" if self.grouped else ""))
    if int(h.skipped) > self.reported and self.is_main:
      log.warning("%s: %d step(s) skipped so far (last: %s); their updates were not applied",
                  self.workdir, int(h.skipped), describe_health(h, self.names))
    self.reported = int(h.skipped)

  def save(self, step: int, state, seconds: float) -> None:
    if self.ckpt is None or step in self.ckpt.manager.all_steps():
      return
    epoch, b = self.setup.batches.position(step)
    self.ckpt.save(step, state, self.base_rng, {
        "step": step, "epoch": epoch, "batch": b,
        "train_seconds": self.seconds_before + seconds})

  def close(self) -> None:
    if self.selector is not None:
      self.selector.close()
    if self.ckpt is not None:
      self.ckpt.close()
    if self.log_file is not None:
      self.log_file.close()
    if self.tb is not None:
      self.tb.close()
