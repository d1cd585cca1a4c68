"""The entry points: one run (:func:`train_and_evaluate`) or several seeds of one
config, as one vmapped program where they allow it (:func:`train_seeds`); and
the same reusing what is done (:func:`run_once`, :func:`run_seeds`: a finished
run of the same config is read back, :func:`finished`, an unfinished one
resumes), as ``compare``, ``tune`` and the experiments run them."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from modalimmune_jax import build
from modalimmune_jax.config import validate_config, with_overrides
from modalimmune_jax.methods.base import Method, ModelFns
from modalimmune_jax.step import device_batch, make_periodic_step, make_train_step
from modalimmune_jax.train.loop import train_loop
from modalimmune_jax.train.run import Run
from modalimmune_jax.train.assemble import make_predict_fn
from modalimmune_jax.train.workdir import WorkdirError, check_workdir

__all__ = ["train_and_evaluate", "train_seeds", "one_program"]

log = logging.getLogger("modalimmune_jax.train")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: Method | Callable[[ModelFns], Method] | None = None,
                       on_change: str = "refuse") -> dict[str, Any]:
  """Trains, checkpoints, resumes and evaluates under the protocol.

  Everything the user gave is checked first (config values, data files, the
  work directory's own config, see
  :func:`~modalimmune_jax.train.workdir.check_workdir` for ``on_change``);
  nothing is created before. Then writes into ``workdir``: ``config.json``,
  ``metrics.jsonl`` (train and validation logs, and the method's events such
  as ``hypergrad`` records), ``checkpoints/``, and at the end ``results.md`` /
  ``results.json`` (the missing-modality table with its provenance) and
  ``results.png`` (the headline metric per condition).

  The loop (:mod:`modalimmune_jax.train.loop`) never waits for the device
  between steps. SIGTERM / SIGINT save a checkpoint and raise
  :class:`~modalimmune_jax.train.workdir.Interrupted`; rerunning resumes exactly.

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
  configs = [with_overrides(config, {"seed": int(s), "train.seeds": ()}) for s in seeds]
  # every data file is read and checked here, once unless the data depend on the seed
  first = build.load_data(configs[0])
  datasets = [build.load_data(c) if _seed_dependent_data(c) and i else first
              for i, c in enumerate(configs)]
  if len(seeds) > 1:
    for c, w in zip(configs, workdirs):  # refuse before anything is written
      if on_change != "fresh":
        check_workdir(c, w, on_change)
  runs = [Run(c, w, d, method, on_change) for c, w, d in zip(configs, workdirs, datasets)]
  steps = [r.restore() for r in runs]
  why = one_program(runs) if together and len(runs) > 1 else None
  if why is not None:
    log.warning("training the seeds one at a time: %s", why)
  if together and why is None:  # one program: every run resumes from the newest step all have
    while len(set(steps)) > 1:
      steps = [r.restore(at_most=min(steps)) for r in runs]
  groups = [runs] if together and why is None else [[r] for r in runs]
  predict = make_predict_fn(runs[0].setup.graphdef, runs[0].method.predict_hook,
                            runs[0].setup.model.compute_dtype)
  summaries = []
  for group in groups:
    for r in group:
      r.open(predict, grouped=len(group) > 1)
    summaries += train_loop(group, predict, vmapped=len(group) > 1)
  return summaries


def finished(config, workdir: str, quiet: bool = False) -> dict | None:
  """``results.json`` of a finished run of ``config`` in ``workdir``, or None
  (``quiet``: without the "done already" line).

  The run's config must equal ``config`` except in the other methods' sections
  (:func:`modalimmune_jax.config.differences`) and the keys that only change
  what is logged (:data:`~modalimmune_jax.config.LOGGING_ONLY`): a key added to
  EBR's section does not make the finished plain runs stale, one added to
  plain's would.
  """
  from modalimmune_jax.config import LOGGING_ONLY, differences
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  diff = differences(record.get("config") or {}, config, ignore=LOGGING_ONLY)
  if not diff:
    if not quiet:
      print(f"done already: {workdir}", file=sys.stderr)
    return record
  listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff[:4])
  more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
  raise WorkdirError(f"{workdir} holds a finished run of another config ({listed}{more}); "
                     "move it away or choose another --workdir")


def run_seeds(config, seeds, workdirs, together: bool = False) -> list[dict]:
  """``results.json`` of ``config`` at each seed, training (or finishing) those
  not done: as one vmapped program when ``together`` (see
  :func:`train_seeds`)."""
  records = {s: finished(with_overrides(config, {"seed": s}), w) for s, w in zip(seeds, workdirs)}
  todo = [(s, w) for s, w in zip(seeds, workdirs) if records[s] is None]
  if todo:
    train_seeds(config, [s for s, _ in todo], [w for _, w in todo], together=together)
    for s, w in todo:
      with open(os.path.join(w, "results.json")) as f:
        records[s] = json.load(f)
  return [records[s] for s in seeds]


def run_once(config, workdir: str) -> dict:
  """``results.json`` of a run, training it (or finishing it) if needed."""
  return run_seeds(config, [config.seed], [workdir])[0]


def _seed_dependent_data(config: ml_collections.ConfigDict) -> bool:
  """Whether :func:`~modalimmune_jax.build.load_data` draws the data from
  ``config.seed`` (synthetic with ``data.synthetic.seed = -1``)."""
  return config.data.name == "synthetic" and config.data.synthetic.get("seed", -1) < 0


def _values(x) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def one_program(runs: Sequence[Run]) -> str | None:
  """Why the runs cannot share one vmapped program (None if they can): their
  steps must trace to the same program (a method whose functions close over
  seed-dependent values cannot), on data of the same shapes."""
  def program(r):
    s = r.setup
    batch = device_batch(s.batches(0))
    programs = [make_train_step(s.method, s.optimizer)]
    programs += [make_periodic_step(s.method, p) for p in s.method.periodic]
    closed = [jax.make_jaxpr(f)(r.state, batch, r.base_rng) for f in programs]
    return "\n".join(str(c.jaxpr) for c in closed), [x for c in closed for x in c.consts]
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
