"""Training and evaluation: setup from a config, the loop, the results.

The model is split once into ``(graphdef, params)`` and wrapped as
:class:`~modalimmune_jax.methods.base.ModelFns`; the method that
``config.method.name`` names (:mod:`modalimmune_jax.methods`) supplies the
loss, its state and its periodic update; :mod:`modalimmune_jax.step` turns
them into the pure, data-parallel step over one
:class:`~modalimmune_jax.step.TrainState`; :mod:`modalimmune_jax.checkpoint`
saves that state in one piece.

* :func:`setup`: data, model, method, optimiser, mesh, state and step.
* :func:`train_and_evaluate`: the loop with orbax checkpoints (resume from the
  latest good one), a progress bar, JSON-lines metrics and method events, and
  the missing-modality protocol at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from modalimmune_jax import data as data_lib
from modalimmune_jax import methods as methods_lib
from modalimmune_jax import protocol
from modalimmune_jax.checkpoint import Checkpointer
from modalimmune_jax import config as config_lib
from modalimmune_jax.config import validate_config
from modalimmune_jax.methods.base import Method, ModelFns
from modalimmune_jax.metrics import HEADLINE
from modalimmune_jax.methods.cmpt import model_parts as cmpt_model_parts
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.plots import plot_protocol
from modalimmune_jax.provenance import markdown_lines, provenance
from modalimmune_jax.step import (TrainState, device_batch, device_data, fault_names,
                                  gather_batch, host_copy, init_state, make_loop_step,
                                  make_mesh, make_parallel_step, make_train_step,
                                  seed_state, shard_batch, shard_indices, split_arrays,
                                  stack_states)

__all__ = [
    "NonFiniteError", "WorkdirError", "Interrupted", "load_data", "check_workdir", "build_model", "make_optimizer", "make_predict_fn",
    "Batches", "Setup", "setup", "train_and_evaluate", "train_seeds", "eval_conditions", "evaluate_split",
]

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
  """Training met non-finite values too many steps in a row (or was told to stop
  at the first); the message names the step and the terms."""


class WorkdirError(ValueError):
  """The work directory holds a run that another config made."""


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT: a checkpoint was saved and the run stopped."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


# ------------------------------------------------------------------ setup ----

def load_data(config: ml_collections.ConfigDict) -> data_lib.MultimodalDataset:
  """The data set a config names."""
  d = config.data
  if d.name == "synthetic":
    s = d.synthetic.to_dict()
    # ConfigDict sorts the keys of ``shapes``: the order is ``modalities``.
    shapes = s.pop("shapes")
    s["shapes"] = {m: tuple(shapes[m]) for m in s.pop("modalities")}
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
      **cmpt_model_parts(config),
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

  ``step_fn(state, batch, rng)`` takes a host batch (``shard_batch``);
  ``loop_fn(state, data, indices, base_rng)`` is the loop's form
  (:func:`~modalimmune_jax.step.make_loop_step`): ``k`` steps per call on the
  device-resident split. Both compile on first use.
  """
  dataset: data_lib.MultimodalDataset
  model: ModelFns
  method: Method
  state: TrainState
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  step_fn: Callable
  batches: "Batches"
  loop_fn: Callable

  @property
  def graphdef(self):
    return self.model.graphdef


def setup(config: ml_collections.ConfigDict,
          method: Method | Callable[[ModelFns], Method] | None = None, *,
          optimizer: optax.GradientTransformation | None = None,
          num_devices: int | None = None,
          dataset: data_lib.MultimodalDataset | None = None) -> Setup:
  """Data, model, method, optimiser, mesh, the replicated train state and the
  data-parallel step.

  ``method`` defaults to the one ``config.method.name`` names; a callable
  ``model_fns -> Method`` builds a custom one. ``optimizer`` defaults to
  :func:`make_optimizer`; the method's transforms are put in front of it
  either way (and its ``post_transforms`` after it). ``num_devices`` defaults to
  ``config.train.num_devices``.
  """
  dataset = dataset or load_data(config)
  mesh = make_mesh(config.train.num_devices if num_devices is None else num_devices)
  if config.train.batch_size % mesh.devices.size:
    raise ValueError(f"train.batch_size {config.train.batch_size} is not divisible by "
                     f"the {mesh.devices.size} devices")
  graphdef, params = nnx.split(build_model(config, dataset))
  model = ModelFns(graphdef, dataset.modality_names, dataset.task,
                   config.train.regression_loss)
  if method is None:
    method = methods_lib.from_config(config, model, dataset)
  elif not isinstance(method, Method):
    method = method(model)
  optimizer = (make_optimizer(config, method.transforms) if optimizer is None
               else optax.chain(*method.transforms, optimizer))
  if method.post_transforms:
    optimizer = optax.chain(optimizer, *method.post_transforms)
  state = jax.device_put(init_state(params, optimizer, method), NamedSharding(mesh, P()))
  t = config.train
  step_fn = make_parallel_step(method, optimizer, mesh, _max_nonfinite(config))
  loop_fn = make_loop_step(method, optimizer, mesh, _max_nonfinite(config))
  batches = Batches(dataset.splits["train"], t.batch_size, config.seed)
  return Setup(dataset, model, method, state, optimizer, mesh, step_fn, batches, loop_fn)


def _max_nonfinite(config: ml_collections.ConfigDict) -> int:
  """Bad steps in a row after which the step halts (1 with ``on_nonfinite='stop'``)."""
  t = config.train
  return 1 if t.on_nonfinite == "stop" else t.max_nonfinite


def make_predict_fn(graphdef: nnx.GraphDef, predict_hook: Callable | None = None) -> Callable:
  """``predict(params, batch, method_state=None) -> outputs`` (jitted, evaluation
  mode). With a method's ``predict_hook`` (``Method.predict_hook``) the model
  runs with the hook ``predict_hook(params, method_state)`` (EBR's test-time fill)."""
  @jax.jit
  def predict(params, batch, method_state=None):
    model = nnx.merge(graphdef, params)
    hook = None if predict_hook is None else predict_hook(params, method_state)
    return model(batch["inputs"], batch["masks"], batch["presence"],
                 embedding_hook=hook)["outputs"]
  return predict


def _jsonable(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items()}


def eval_conditions(config: ml_collections.ConfigDict,
                    modality_names: Sequence[str]) -> list[protocol.Condition]:
  """The protocol's conditions that ``config.eval`` asks for."""
  e = config.eval
  top = (len(modality_names) - 1) / len(modality_names)
  if any(eta > top + 1e-9 for eta in e.cell_etas):
    from modalimmune_jax.config import ConfigError
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


class _ValidSelector:
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


def check_workdir(config: ml_collections.ConfigDict, workdir: str,
                  on_change: str = "refuse") -> str | None:
  """Compares ``config`` with the one ``workdir`` was made with (``config.json``).

  ``on_change``: ``"refuse"`` raises :class:`WorkdirError` naming the keys
  that change what is trained (model, data, method, optimiser, seed, steps;
  see :data:`~modalimmune_jax.config.RUN_INDEPENDENT` for those that may
  change); ``"fresh"`` moves the old directory aside (``WORKDIR.old-TIME``)
  and starts again; ``"extend"`` accepts a larger ``train.steps`` (and
  nothing else) and trains the run on. Returns what happened: None (new or
  same), ``"moved"`` or ``"extended"``. Touches nothing unless ``fresh``.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path}: unreadable ({e}); use --fresh to move the run aside") from e
  diff = [(k, a, b) for k, a, b in config_lib.trained_differences(old, config)]
  if not diff:
    return None
  listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff)
  if on_change == "fresh":
    target = f"{workdir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(workdir, target)
    log.warning("%s was made with another config (%s); moved it to %s", workdir, listed, target)
    return "moved"
  if on_change == "extend":
    if [k for k, _, _ in diff] == ["train.steps"] and diff[0][2] > diff[0][1]:
      return "extended"
    raise WorkdirError(f"{workdir}: --extend trains a run on to a larger train.steps and "
                       f"changes nothing else; this config changes {listed}")
  raise WorkdirError(f"{workdir} was made with another config: {listed}. Use --fresh to move "
                     "it aside and start again, --extend to train on to more steps, or "
                     "another --workdir")


class _StopSignals:
  """Turns SIGTERM / SIGINT into a flag the loop polls (main thread only);
  a second signal gets the default behaviour."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signum
    self._restore()

  def _restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()
    return False


def _describe_health(health, names: Sequence[str]) -> str:
  terms = [n for i, n in enumerate(names) if int(health.terms) >> i & 1] or ["values"]
  return f"non-finite {', '.join(terms)} at step {int(health.last_bad)}"


def _seed_dependent_data(config: ml_collections.ConfigDict) -> bool:
  """Whether :func:`load_data` draws the data from ``config.seed`` (synthetic)."""
  return config.data.name == "synthetic"


class _Run:
  """One run of the loop (:func:`_train`): its config, data, work directory,
  checkpoints, log and validation selector. Every check of the user's input
  happens in the constructor, before anything is written."""

  def __init__(self, config, workdir, dataset, method, on_change):
    self.config, self.workdir, self.dataset = config, workdir, dataset
    self.is_main = jax.process_index() == 0
    for split, counts in dataset.meta.get("nonfinite", {}).items():
      if sum(counts.values()) and self.is_main:
        log.warning("%s: replaced non-finite values: %s", split, counts)
    if config.train.batch_size > dataset.splits["train"].num_samples:
      raise config_lib.ConfigError(
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
    self.log_file, self.selector, self.reported, self.grouped = None, None, 0, False
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
      raise config_lib.ConfigError(
          f"config key 'train.steps_per_dispatch' ({config.train.steps_per_dispatch}) must "
          f"divide the resumed step {self.start}")
    path = os.path.join(workdir, "config.json")
    if self.is_main and (self.change is not None or not os.path.isfile(path)):
      with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    if self.is_main:
      self.log_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if self.start:  # records after this line supersede earlier ones with a larger step
      self.write_log({"event": "resume", "step": self.start,
                      **({"extended_to": config.train.steps} if self.change == "extended"
                         else {})})
    if config.eval.select == "valid":
      self.selector = _ValidSelector(config, self.dataset, predict, workdir, self.state,
                                     self.base_rng, self.eval_state)
    self.reported = int(host_copy(self.state.health).skipped)

  def write_log(self, record: dict) -> None:
    if self.log_file is not None:
      self.log_file.write(json.dumps(record) + "\n")
      self.log_file.flush()

  def check_health(self, h) -> None:
    """Stops on a halted run, warns on new skips (``h``: host :class:`Health`)."""
    t = self.config.train
    if h.halted:
      limit = ("train.on_nonfinite='stop'" if t.on_nonfinite == "stop"
               else f"train.max_nonfinite={t.max_nonfinite}")
      raise NonFiniteError(f"{_describe_health(h, self.names)}: {int(h.run)} bad step(s) in a "
                           f"row ({limit}); stopping. No update of a bad step was applied"
                           + (f" ({self.workdir})" if self.grouped else ""))
    if int(h.skipped) > self.reported and self.is_main:
      log.warning("%s: %d step(s) skipped so far (last: %s); their updates were not applied",
                  self.workdir, int(h.skipped), _describe_health(h, self.names))
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

  def finish(self, state, predict, *, stopped: bool, train_seconds: float,
             first_step_seconds: float | None, seeds_together: Sequence[int]) -> dict:
    """The summary; unless stopped early, the protocol on ``eval.split`` and the
    result files."""
    config, dataset, method = self.config, self.dataset, self.method
    health = state.health
    summary: dict[str, Any] = {
        "method": method.name, "dataset": dataset.name, "task": dataset.task,
        "steps": config.train.steps, "start_step": self.start, "stopped": stopped,
        "nonfinite_skipped": int(health.skipped), "devices": self.setup.mesh.devices.size,
        "processes": jax.process_count(), "first_step_seconds": first_step_seconds,
        "train_seconds": train_seconds,
        "train_seconds_total": self.seconds_before + train_seconds,
        "config": json.loads(config.to_json_best_effort()),
    }
    if len(seeds_together) > 1:  # one vmapped program: its time is all seeds' time
      summary["seeds_together"] = list(seeds_together)
    final_state = host_copy(state)
    summary["final_params"] = final_params = final_state.params
    summary["final_state"] = final_state
    if stopped:
      return summary
    split = dataset.splits[config.eval.split]
    conditions = eval_conditions(config, dataset.modality_names)
    final_method_state = self.eval_state(final_state)
    if self.selector is not None:  # one checkpoint for every metric: the one chosen on valid
      summary["selection"] = self.selector.summary()
      final_params = self.selector.best_params
      final_method_state = self.selector.best_method_state
    result = protocol.evaluate(
        lambda b: predict(final_params, device_batch(b), final_method_state), split,
        conditions, batch_size=config.eval.batch_size, seed=config.eval.seed,
        progress=lambda it: tqdm(it, desc="protocol", unit="condition",
                                 disable=not self.is_main, dynamic_ncols=True))
    headline = HEADLINE[dataset.task]
    summary["valid"] = evaluate_split(predict, final_params, dataset.splits["valid"],
                                      config.eval.batch_size, final_method_state)
    summary["protocol"] = result.to_dict()
    summary["headline_metric"] = headline
    record = {k: v for k, v in summary.items() if k not in ("final_params", "final_state")}
    record["provenance"] = provenance(seed=config.seed, eval_seed=config.eval.seed)
    if self.is_main:
      with open(os.path.join(self.workdir, "results.json"), "w") as f:
        json.dump(record, f, indent=2, default=float)
      with open(os.path.join(self.workdir, "results.md"), "w") as f:
        f.write(render_results(record, result))
      plot_protocol(result, headline, os.path.join(self.workdir, "results.png"),
                    title=f"{method.name} on {dataset.name}, {config.eval.split} split")
    summary["table"] = result
    return summary


def _values(x) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _one_program(runs: Sequence[_Run]) -> str | None:
  """Why the runs cannot share one vmapped program (None if they can): their
  steps must trace to the same program (a method whose functions close over
  seed-dependent values cannot), on data of the same shapes."""
  def program(r):
    s = r.setup
    step = make_train_step(s.method, s.optimizer)
    batch = device_batch(s.batches(0))
    closed = jax.make_jaxpr(step)(r.state, batch, r.base_rng)
    return str(closed.jaxpr), closed.consts
  shapes = [{m: x.shape for m, x in r.host_data["inputs"].items()} for r in runs]
  if any(s != shapes[0] for s in shapes):
    return f"the seeds' data differ in shape: {shapes}"
  text, consts = program(runs[0])
  for r in runs[1:]:
    other, other_consts = program(r)
    if other != text or len(consts) != len(other_consts) or not all(
        np.array_equal(_values(a), _values(b)) for a, b in zip(consts, other_consts)):
      return (f"the step of seed {r.config.seed} is another program than seed "
              f"{runs[0].config.seed}'s (the method closes over seed-dependent values)")
  return None


def _train(runs: Sequence[_Run], predict: Callable, vmapped: bool) -> list[dict[str, Any]]:
  """The loop over ``runs`` (one, or several seeds of one config as one vmapped
  program), then each run's evaluation with ``predict``. The runs are open and
  at one step."""
  lead = runs[0]
  config, mesh, method = lead.config, lead.setup.mesh, lead.method
  k, steps, stop_after = (config.train.steps_per_dispatch, config.train.steps,
                          config.train.stop_after)
  t = config.train
  shared = all(r.dataset is lead.dataset for r in runs)
  on_device = t.device_data == "device" or (
      t.device_data == "auto" and mesh.devices.flat[0].platform != "cpu")
  data = None  # host pipeline
  if on_device:
    data = (device_data(lead.dataset.splits["train"], mesh) if shared else
            jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *[r.host_data for r in runs]),
                           NamedSharding(mesh, P())))
  if vmapped:
    state = stack_states([r.state for r in runs])
    base = jax.numpy.stack([r.base_rng for r in runs])
    part = lambda tree, j: jax.tree.map(lambda x: x[j], tree)
    state_of = seed_state
    rows_of = lambda m, j: jax.tree.map(lambda x: x[:, j], m)
    optimizer, max_bad = lead.setup.optimizer, _max_nonfinite(config)
    if on_device:
      loop_fn = make_loop_step(method, optimizer, mesh, max_bad,
                               seeds="shared" if shared else "stacked")
    else:
      step_fn = make_parallel_step(method, optimizer, mesh, max_bad, seeds=True)
  else:
    state, base = lead.state, lead.base_rng
    part = state_of = rows_of = lambda tree, j: tree
    loop_fn, step_fn = lead.setup.loop_fn, lead.setup.step_fn

  def dispatch(state, step):
    """``k`` steps; the metrics as one ``(k, [S,] ...)`` tree or a list of ``k``."""
    idx = [r.setup.batches.indices(step, k) for r in runs]
    if data is not None:
      return loop_fn(state, data, shard_indices(np.stack(idx) if vmapped else idx[0], mesh),
                     base)
    outs = []
    for i in range(k):  # host pipeline: batch i + 1 is put while step i runs
      if vmapped:
        batch = jax.tree.map(lambda *xs: np.stack(xs),
                             *[gather_batch(r.host_data, ix[i]) for r, ix in zip(runs, idx)])
        state, metrics = step_fn(state, shard_batch(batch, mesh, seeds=True), base)
      else:
        batch = shard_batch(gather_batch(lead.host_data, idx[0][i]), mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base, step + i))
      outs.append(metrics)
    return state, outs

  def fetch(metrics):
    """Host copies, stacked ``(k, ...)`` (read at intervals only)."""
    if isinstance(metrics, list):
      return jax.tree.map(lambda *xs: np.stack(xs), *host_copy(metrics))
    return host_copy(metrics)

  t_session = time.perf_counter()
  bar = tqdm(total=steps, initial=lead.start, disable=not lead.is_main, desc="train",
             unit="step", dynamic_ncols=True)
  first_step_seconds, stopped, done = None, False, lead.start
  try:
    with _StopSignals() as signals:
      for step in range(lead.start, steps, k):
        t0 = time.perf_counter()
        state, metrics = dispatch(state, step)
        if first_step_seconds is None:
          jax.block_until_ready(state.step)
          first_step_seconds = time.perf_counter() - t0
        done = step + k
        bar.update(k)
        fetched = []

        def rows(j):
          if not fetched:
            fetched.append(fetch(metrics))
          return rows_of(fetched[0], j)
        if method.events is not None:
          for j, r in enumerate(runs):
            for i in range(k):
              for record in method.events(step + i + 1,
                                          lambda i=i, j=j: jax.tree.map(lambda x: x[i], rows(j))):
                r.write_log(record)
        received = signals.received  # read once: a signal may arrive at any moment
        log_now = done % t.log_every == 0 or done == steps
        save_now = lead.ckpt is not None and (done % config.checkpoint.every == 0 or
                                              done == steps or done == stop_after or
                                              received is not None)
        if log_now or save_now:
          health = host_copy(state.health)
          for j, r in enumerate(runs):
            h = part(health, j)
            r.check_health(h)
            if log_now:
              values = _jsonable(jax.tree.map(lambda x: x[-1], rows(j)))
              r.write_log({"step": done, "split": "train", **values,
                           "nonfinite_skipped": int(h.skipped),
                           "seconds": round(time.perf_counter() - t_session, 3)})
          if log_now:
            bar.set_postfix(loss=f"{float(np.mean(fetched[0]['loss'][-1])):.4f}")
        if t.eval_every and done % t.eval_every == 0 and done < steps:
          for j, r in enumerate(runs):
            st = state_of(state, j)
            params, method_state = host_copy(st.params), r.eval_state(st)
            values = evaluate_split(predict, params, r.dataset.splits["valid"],
                                    config.eval.batch_size, method_state)
            if r.selector is not None:
              values["selection_score"] = r.selector.consider(done, st, params, method_state)
            r.write_log({"step": done, "split": "valid", **values})
        if save_now:
          for j, r in enumerate(runs):
            r.save(done, state_of(state, j), time.perf_counter() - t_session)
        if received is not None:
          name = signal.Signals(received).name
          saved = "checkpoint saved" if lead.ckpt is not None else "no checkpoint (disabled)"
          raise Interrupted(f"{name} at step {done}: {saved}; rerun the same command to "
                            "resume", received)
        if stop_after and done == stop_after and done < steps:
          stopped = True
          break
      health = host_copy(state.health)
      for j, r in enumerate(runs):
        r.check_health(part(health, j))
        if r.selector is not None and not stopped:  # the final state is a candidate too
          st = state_of(state, j)
          r.selector.consider(done, st, host_copy(st.params), r.eval_state(st))
  finally:
    bar.close()
    for r in runs:
      r.close()
  train_seconds = time.perf_counter() - t_session
  seeds = [r.config.seed for r in runs]
  return [r.finish(state_of(state, j), predict, stopped=stopped, train_seconds=train_seconds,
                   first_step_seconds=first_step_seconds, seeds_together=seeds)
          for j, r in enumerate(runs)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: Method | Callable[[ModelFns], Method] | None = None,
                       on_change: str = "refuse") -> dict[str, Any]:
  """Trains, checkpoints, resumes and evaluates under the protocol.

  Everything the user gave is checked first (config values, data files, the
  work directory's own config, see :func:`check_workdir` for ``on_change``);
  nothing is created before. Then writes into ``workdir``: ``config.json``,
  ``metrics.jsonl`` (train and validation logs, and the method's events such
  as ``hypergrad`` records), ``checkpoints/``, and at the end ``results.md`` /
  ``results.json`` (the missing-modality table with its provenance) and
  ``results.png`` (the headline metric per condition).

  The loop never waits for the device between steps: batches are gathered on
  the device on accelerators (``train.device_data``; on CPU the host gathers
  them, measured faster there), ``train.steps_per_dispatch`` steps run
  per call, and the non-finite counters are read at logging and checkpoint
  intervals only. SIGTERM / SIGINT save a checkpoint and raise
  :class:`Interrupted`; rerunning resumes exactly.

  Returns the summary dict written to ``results.json`` (``"stopped": True``
  when ``train.stop_after`` ended the run early), plus ``final_params`` and
  ``final_state`` (host copies).
  """
  return train_seeds(config, [config.seed], [workdir], method, on_change)[0]


def train_seeds(config: ml_collections.ConfigDict, seeds: Sequence[int],
                workdirs: Sequence[str],
                method: Method | Callable[[ModelFns], Method] | None = None,
                on_change: str = "refuse", together: bool = True) -> list[dict[str, Any]]:
  """:func:`train_and_evaluate` of ``config`` at each of ``seeds`` (``config.seed``
  replaced; ``workdirs[i]`` for ``seeds[i]``), as **one vmapped program** when
  ``together`` and the runs allow it: the same step program for every seed
  (checked by tracing; a method that closes over seed-dependent values falls
  back), data of the same shapes, and checkpoints that agree on a step (runs
  ahead of the others are moved back to the newest step they all have).

  Each seed keeps its own work directory, checkpoints, log, results and
  provenance, in the format of a separate run (plus ``seeds_together``; its
  ``train_seconds`` is the shared program's). The seeds train exactly as
  separate runs up to float32 reassociation in the batched kernels (see
  ``tests/test_seeds.py`` for the tolerance); the step counter is shared, so
  the methods' periodic ``lax.cond`` stay branches.

  Example:
    >>> summaries = train_seeds(config, [0, 1, 2], ["runs/s0", "runs/s1", "runs/s2"])
  """
  validate_config(config)
  if len(seeds) != len(workdirs) or not seeds:
    raise ValueError(f"need one work directory per seed, got {len(seeds)} seeds and "
                     f"{len(workdirs)} directories")
  configs = [config_lib.with_overrides(config, {"seed": int(s), "train.seeds": ()})
             for s in seeds]
  # every data file is read and checked here, once unless the data depend on the seed
  first = load_data(configs[0])
  datasets = [load_data(c) if _seed_dependent_data(c) and i else first
              for i, c in enumerate(configs)]
  if len(seeds) > 1:
    for c, w in zip(configs, workdirs):  # refuse before anything is written
      if on_change != "fresh":
        check_workdir(c, w, on_change)
  runs = [_Run(c, w, d, method, on_change) for c, w, d in zip(configs, workdirs, datasets)]
  steps = [r.restore() for r in runs]
  why = _one_program(runs) if together and len(runs) > 1 else None
  if why is not None:
    log.warning("training the seeds one at a time: %s", why)
  if together and why is None:  # one program: every run resumes from the newest step all have
    while len(set(steps)) > 1:
      steps = [r.restore(at_most=min(steps)) for r in runs]
  groups = [runs] if together and why is None else [[r] for r in runs]
  predict = make_predict_fn(runs[0].setup.graphdef, runs[0].method.predict_hook)
  summaries = []
  for group in groups:
    for r in group:
      r.open(predict, grouped=len(group) > 1)
    summaries += _train(group, predict, vmapped=len(group) > 1)
  return summaries


def render_results(record: dict, result: protocol.ProtocolResult) -> str:
  """The markdown report: what ran, where, and the protocol table."""
  prov = record["provenance"]
  cfg = record["config"]
  lines = [
      f"# {record['method']} on {record['dataset']} ({record['task']}), "
      f"{cfg['eval']['split']} split",
      "",
      *markdown_lines(prov, f"{record['devices']} device(s) x {record['processes']} "
                      "process(es)"),
      f"- seeds: model/data {cfg['seed']}, protocol {cfg['eval']['seed']}",
      f"- training: {record['steps']} steps, batch {cfg['train']['batch_size']}, "
      f"{record['train_seconds_total']:.1f} s in all, {record['nonfinite_skipped']} non-finite "
      "steps skipped",
      "",
      result.to_markdown(digits=4),
      "",
  ]
  return "\n".join(lines)
