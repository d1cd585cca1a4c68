"""Hyper-parameter search with Optuna, on one machine or many sharing one study.

    python -m modalimmune_jax.tune --config=experiments/configs/mfeat.py --workdir=runs/tune_mi \\
        --space=modalimmune --trials=20 --sampler=tpe [--storage=URL] [--study=NAME] [--seed=0]

Every trial trains one run of ``with_overrides(config, sampled)`` with
``eval.split = valid`` in its own work directory ``WORKDIR/trials/<number>``
(:func:`modalimmune_jax.train.run_once`: a rerun resumes or reuses it) and
scores it by the selection score (:func:`modalimmune_jax.protocol.selection_score`:
the headline metric averaged over ``full`` and every missing-modality
condition), maximised (minimised for MAE). The test split never enters a
choice. The study lives in an Optuna storage: by default
``sqlite:///WORKDIR/study.db``; ``--storage`` takes any SQLAlchemy URL Optuna's
``RDBStorage`` accepts (``postgresql://user:{PGPASSWORD}@host/db``, ``mysql+pymysql://...``;
``{NAME}`` is filled from the environment, so a password need not be on the
command line), so workers on several machines started with the same command
(a SLURM array, a Kubernetes job) share one study (``load_if_exists``). A
worker may join a study only with the same base config and space (else one
line naming the keys that differ).

**Search spaces** (:data:`SPACES`, ``--space``): ``modalimmune``
(ModalImmune's initial meta-parameters lambda = ``method.modalimmune.collapse_weight``
and mu = ``method.reconstruction_weight`` on a log scale, ``kappa`` and ``eta``
linear; BHGD tunes them on from there), ``plain`` (the optimiser's learning
rate and weight decay, both log scale, for ``plain``), ``optim`` (the same for
the config's own method), and ``method:<name>``: the method's own
:attr:`~modalimmune_jax.methods.base.MethodSpec.search` rows (``compare``'s
trials) as one categorical choice. Each space gives a grid (a few values per
key) for ``--sampler=grid``.

**Samplers** (``--sampler``, all seeded by ``--seed``): ``tpe``
(``TPESampler``, with ``constant_liar`` for parallel workers), ``random``
(``RandomSampler``) and ``grid`` (``GridSampler`` over the space's grid; the same
seed in every worker is what keeps workers from repeating grid points, and
``--trials`` may not exceed the grid). TPE and random are re-seeded for every
trial from ``(--seed, trial number)``: workers started with the same
``--seed`` would otherwise draw the same points. One worker is reproducible;
with several, what TPE sees depends on which trials have finished.

**Exactly ``--trials``.** Each worker runs trials until the study holds
``--trials`` COMPLETE trials. ``optuna.study.MaxTrialsCallback`` would
overshoot with several workers (each checks after its trial, then starts
another), so a trial first counts the study: when the COMPLETE trials plus the
RUNNING / WAITING ones numbered before it already reach ``--trials`` it is not
run (recorded as FAIL with ``surplus``, no run directory; FAIL keeps it out of
the samplers' history). A worker with nothing left to start waits for the
trials running elsewhere (polling the storage, at most one heartbeat apart), so
that it can take over one whose worker dies.

A work directory serves one study (``WORKDIR/study.json`` names it; another
``--study`` there is refused: its trial numbers would share ``trials/``).

**Killed workers: Optuna's heartbeat, not a scan at start.** Trials run with
``RDBStorage(heartbeat_interval=--heartbeat, grace_period=3 x heartbeat,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))``:
a RUNNING trial whose heartbeat is older than the grace period is marked FAIL
by the next worker that looks, and its parameters are queued again (WAITING),
carrying the number of the killed trial's run directory, so the retry resumes
that run from its checkpoint. Marking every RUNNING trial stale when a worker
starts would be wrong as soon as several workers share the study: the trials
of live workers are RUNNING too. A worker stopped by SIGTERM / SIGINT (a SLURM
preemption) saves its run's checkpoint, queues its trial again the same way
and exits with 128 + the signal.

At the end of every worker, and with ``--collect`` (which runs no trial),
``WORKDIR/tuning.md``, ``tuning.json`` and ``tuning.png`` are written: every
trial (number, state, params, overrides, valid score, seconds, run directory,
retries), the best trial with its overrides as ``--config.KEY=VALUE`` flags
ready to paste, the study, storage (password hidden) and :func:`provenance`;
the figure is the best valid score so far against wall-clock time. One line per
finished trial goes to stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Any, NamedTuple

import optuna
from absl import flags

from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (:func:`run`), not on import (see
  ``compare.define_flags``)."""
  if "workdir" in FLAGS:  # defined already (this command's run() called twice)
    return

  flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file (path[:variant]): the "
                                  "base config every trial overrides.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  flags.DEFINE_string("space", "modalimmune", "Search space: a name of tune.SPACES "
                      "(modalimmune, plain, optim) or method:<name> (the method's search rows).")
  flags.DEFINE_integer("trials", 20, "COMPLETE trials the study should hold, over all workers.",
                       lower_bound=1)
  flags.DEFINE_enum("sampler", "tpe", ["tpe", "random", "grid"], "Optuna sampler.")
  flags.DEFINE_string("storage", "", "Optuna RDB storage URL (default sqlite:///WORKDIR/study.db); "
                      "{NAME} is filled from the environment.")
  flags.DEFINE_string("study", "", "Study name (default: <data.name>-<space>).")
  flags.DEFINE_integer("seed", 0, "Seed of the sampler (not of the training runs: config.seed).")
  flags.DEFINE_integer("heartbeat", 60, "Seconds between a running trial's heartbeats; a trial "
                       "silent for 3 heartbeats is taken as killed and retried.", lower_bound=1)
  flags.DEFINE_bool("collect", False, "Only write tuning.md / .json / .png of the study; "
                    "run no trial.")


__all__ = ["Float", "Choice", "Space", "SPACES", "space", "trial_overrides", "grid",
           "make_sampler", "trial_config", "override_flags", "records", "render",
           "plot_best_so_far", "Surplus"]


class Float(NamedTuple):
  """A continuous range ``[low, high]`` (``log``: sampled on a log scale) and the
  values ``--sampler=grid`` tries."""
  low: float
  high: float
  log: bool = False
  grid: tuple = ()


class Choice(NamedTuple):
  """A categorical choice (its values are also the grid)."""
  choices: tuple


class Space(NamedTuple):
  """A search space: ``params`` (config key -> :class:`Float` / :class:`Choice`),
  ``fixed`` overrides every trial has, and ``rows`` (for ``method:<name>``: the
  parameter ``search_row`` indexes them, each a dict of overrides)."""
  doc: str
  params: dict
  fixed: dict = {}
  rows: tuple = ()


_OPTIM = {"optim.learning_rate": Float(1e-4, 1e-2, log=True, grid=(3e-4, 1e-3, 3e-3)),
          "optim.weight_decay": Float(1e-6, 1e-2, log=True, grid=(1e-5, 1e-4, 1e-3))}

# The named search spaces. The modalimmune ranges are around the defaults (lambda
# 0.1, kappa 0.9, eta 0.05, mu 1.0; modalimmune_jax/methods/modalimmune.py) and
# inside each key's rule; they are initial values that BHGD tunes during training.
SPACES: dict[str, Space] = {
    "modalimmune": Space(
        "ModalImmune's initial meta-parameters: lambda (collapse_weight) and mu "
        "(reconstruction_weight) log scale, kappa and eta linear",
        {"method.modalimmune.collapse_weight": Float(0.01, 1.0, log=True, grid=(0.03, 0.1, 0.3)),
         "method.modalimmune.kappa": Float(0.8, 0.97, grid=(0.85, 0.9, 0.95)),
         "method.modalimmune.eta": Float(0.01, 0.15, grid=(0.02, 0.05, 0.1)),
         "method.reconstruction_weight": Float(0.1, 3.0, log=True, grid=(0.3, 1.0, 3.0))},
        fixed={"method.name": "modalimmune"}),
    "plain": Space("plain's optimiser: learning rate and weight decay, log scale", _OPTIM,
                   fixed={"method.name": "plain"}),
    "optim": Space("the config's method's optimiser: learning rate and weight decay, log "
                   "scale", _OPTIM),
}
ROW = "search_row"  # the parameter of a method:<name> space


class Surplus(Exception):
  """A trial not run: the study already had ``--trials`` trials complete or running."""


def space(name: str) -> Space:
  """The space ``name`` (:data:`SPACES` or ``method:<name>``); ``cli.FlagError``
  naming ``--space`` otherwise."""
  from modalimmune_jax import cli, methods
  if name.startswith("method:"):
    method = name.split(":", 1)[1]
    if method not in methods.names():
      raise cli.FlagError(f"--space={name}: unknown method {method!r}; known "
                          f"{list(methods.names())}")
    rows = tuple(methods.get(method).search) or ({},)
    return Space(f"{method}'s own search rows (MethodSpec.search)",
                 {ROW: Choice(tuple(range(len(rows))))}, {"method.name": method}, rows)
  if name not in SPACES:
    raise cli.FlagError(f"--space={name}: unknown space; known {sorted(SPACES)} or "
                        f"method:<name> with a method of {list(methods.names())}")
  return SPACES[name]


def trial_overrides(s: Space, trial) -> dict[str, Any]:
  """The config overrides of ``trial`` (an Optuna ``Trial``, ``FixedTrial``, ...)
  in space ``s``: its fixed overrides, then each parameter suggested."""
  out = dict(s.fixed)
  for key, dist in s.params.items():
    if isinstance(dist, Float):
      out[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
    else:
      out[key] = trial.suggest_categorical(key, list(dist.choices))
  if s.rows:
    out.update(s.rows[out.pop(ROW)])
  return out


def grid(s: Space) -> dict[str, list]:
  """The grid ``--sampler=grid`` walks: parameter -> values."""
  return {k: list(d.grid if isinstance(d, Float) else d.choices) for k, d in s.params.items()}


def grid_size(s: Space) -> int:
  n = 1
  for values in grid(s).values():
    n *= len(values)
  return n


def _mixed_seed(seed: int, number: int) -> int:
  import numpy as np
  return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def make_sampler(kind: str, s: Space, seed: int):
  """The Optuna sampler ``kind`` (tpe, random, grid) for space ``s``, seeded."""
  if kind == "grid":
    return optuna.samplers.GridSampler(grid(s), seed=seed)
  if kind == "random":
    return _TrialSeeded(lambda sd: optuna.samplers.RandomSampler(seed=sd), seed)
  if kind == "tpe":
    return _TrialSeeded(lambda sd: optuna.samplers.TPESampler(seed=sd, constant_liar=True), seed)
  raise ValueError(f"unknown sampler {kind!r}")


class _TrialSeeded(optuna.samplers.BaseSampler):
  """``make(seed)`` made anew for every trial with a seed from ``(seed, trial
  number)``: workers with one ``--seed`` draw different points, one worker draws
  the same points every time (TPE and random keep no other state: the history
  comes from the storage)."""

  def __init__(self, make, seed: int):
    self._make, self._seed = make, seed
    self._inner = make(seed)

  def before_trial(self, study, trial):
    self._inner = self._make(_mixed_seed(self._seed, trial.number))
    self._inner.before_trial(study, trial)

  def infer_relative_search_space(self, study, trial):
    return self._inner.infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._inner.sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, param_distribution):
    return self._inner.sample_independent(study, trial, param_name, param_distribution)

  def after_trial(self, study, trial, state, values):
    self._inner.after_trial(study, trial, state, values)

  def reseed_rng(self):  # deterministic by design
    pass


def trial_config(base, overrides: dict):
  """The config a trial trains: ``base`` with ``overrides``, evaluated on the
  valid split, one seed; validated (``ConfigError`` naming the key)."""
  from modalimmune_jax.config import validate_config, with_overrides
  cfg = with_overrides(base, dict(overrides, **{"eval.split": "valid", "train.seeds": ()}))
  validate_config(cfg)
  return cfg


def check_space(base, s: Space) -> None:
  """Every key of ``s`` is a config key and each end of each range, each grid
  value and each choice (the others at their low end) gives a valid config."""
  from optuna.trial import FixedTrial
  low = {k: d.low if isinstance(d, Float) else d.choices[0] for k, d in s.params.items()}
  points = [low, {k: d.high if isinstance(d, Float) else d.choices[-1]
                  for k, d in s.params.items()}]
  for k, values in grid(s).items():
    points += [dict(low, **{k: v}) for v in values]
  for p in points:
    trial_config(base, trial_overrides(s, FixedTrial(p)))


def _value(v) -> str:
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(_value(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return repr(v) if isinstance(v, float) else str(v)


def override_flags(overrides: dict) -> list[str]:
  """``--config.KEY=VALUE`` for each override, shell-quoted where needed.

  Example:
    >>> override_flags({"optim.learning_rate": 0.002, "eval.snrs_db": (10.0,)})
    ['--config.optim.learning_rate=0.002', "'--config.eval.snrs_db=(10.0,)'"]
  """
  return [shlex.quote(f"--config.{k}={_value(v)}") for k, v in overrides.items()]


# ----------------------------------------------------------------- the study

def _redacted(url: str) -> str:
  try:
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)
  except Exception:  # noqa: BLE001
    return url


def open_storage(url: str, heartbeat: int):
  """Optuna's ``RDBStorage`` at ``url`` with the heartbeat and the retry of
  stale trials; ``cli.FlagError`` naming ``--storage`` when it cannot open."""
  import warnings

  import sqlalchemy
  from sqlalchemy.engine import make_url

  from modalimmune_jax import cli
  try:
    filled = url.format(**os.environ) if "{" in url else url
  except (KeyError, IndexError, ValueError) as e:
    raise cli.FlagError(f"--storage={url}: {{NAME}} must name a set environment variable "
                        f"({type(e).__name__}: {e})")
  shown = _redacted(filled)
  try:
    parsed = make_url(filled)
    parsed.get_dialect()
  except Exception as e:  # noqa: BLE001 - unparsable URL, unknown database or driver
    raise cli.FlagError(f"--storage={shown}: not a storage URL Optuna can open "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
  engine = {}
  if parsed.get_backend_name() == "sqlite":
    folder = os.path.dirname(os.path.abspath(parsed.database or ""))
    if parsed.database and parsed.database != ":memory:" and not os.path.isdir(folder):
      raise cli.FlagError(f"--storage={shown}: directory {folder} does not exist")
    engine = {"connect_args": {"timeout": 60}}  # workers wait on each other's writes
  error = None
  for attempt in range(5):  # workers started together race to create the tables
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            filled, engine_kwargs=engine, heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=3))
    except sqlalchemy.exc.SQLAlchemyError as e:  # locked, a table just made by another
      error = e
      time.sleep(0.3 * 2 ** attempt)
    except Exception as e:  # noqa: BLE001 - driver missing, refused, ...
      error = e
      break
  raise cli.FlagError(f"--storage={shown}: cannot open it ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})")


def records(study) -> list[dict]:
  """Every trial of ``study`` as a JSON-able dict, in number order."""
  out = []
  for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
    seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete and t.datetime_start else None)
    history = t.system_attrs.get("retry_history") or []
    out.append({"number": t.number, "state": t.state.name, "value": t.value,
                "params": dict(t.params), "overrides": t.user_attrs.get("overrides"),
                "seconds": seconds,
                "started": t.datetime_start.isoformat() if t.datetime_start else None,
                "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "train_seconds": t.user_attrs.get("train_seconds"),
                "retry_of": history[-1] if history else None,
                "surplus": bool(t.user_attrs.get("surplus")),
                "error": t.user_attrs.get("error")})
  retried = {r["retry_of"]: r["number"] for r in out if r["retry_of"] is not None}
  for r in out:
    r["retried_as"] = retried.get(r["number"])
  return out


def _note(r: dict) -> str:
  parts = []
  if r["retry_of"] is not None:
    parts.append(f"retry of {r['retry_of']}")
  if r["surplus"]:
    parts.append("not run: the study had its trials (surplus)")
  elif r["retried_as"] is not None:
    parts.append(f"worker lost (no heartbeat) or stopped; retried as {r['retried_as']}")
  if r["error"]:
    parts.append(r["error"])
  return "; ".join(parts)


def best_record(trials: list[dict], lower: bool) -> dict | None:
  done = [r for r in trials if r["state"] == "COMPLETE" and r["value"] is not None]
  return (min if lower else max)(done, key=lambda r: r["value"]) if done else None


def render(info: dict, trials: list[dict]) -> str:
  """``tuning.md``: the study, the best trial with its flags, every trial, provenance."""
  from modalimmune_jax.provenance import markdown_lines
  best = info["best"]
  direction = "minimised" if info["lower_is_better"] else "maximised"
  complete = sum(r["state"] == "COMPLETE" for r in trials)
  lines = [f"# Tuning: {info['study']}", "",
           f"Space `{info['space']}` ({info['space_doc']}), sampler `{info['sampler']}` "
           f"(seed {info['seed']}), {complete} of {info['target']} trials complete. Score: "
           f"the selection score on the **valid** split (mean {info['metric']} over full and "
           f"every missing-modality condition), {direction}; the test split is not used. "
           f"Storage: `{info['storage']}`.", ""]
  if best is not None:
    lines += [f"Best: trial {best['number']}, valid score {best['value']:.4f}, run "
              f"`{best['run_dir']}`. Its overrides as flags, after the search's own "
              "`--config.*` flags (the run evaluates on the config's `eval.split`):", "",
              "```bash", f"python -m modalimmune_jax.main --config={info['config_arg']} "
              "--workdir=runs/best \\"]
    if info["base_flags"]:
      lines += ["    " + " ".join(info["base_flags"]) + " \\"]
    lines += ["    " + " ".join(info["best_flags"]), "```", ""]
  else:
    lines += ["No trial is complete yet.", ""]
  lines += ["| trial | state | valid score | seconds | params | note |",
            "|---:|---|---:|---:|---|---|"]
  for r in trials:
    value = "" if r["value"] is None else f"{r['value']:.4f}"
    secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
    params = ", ".join(f"{k}={_value(v) if not isinstance(v, float) else f'{v:.4g}'}"
                       for k, v in r["params"].items())
    if r["overrides"] and ROW in r["params"]:
      params += " (" + ", ".join(f"{k}={_value(v)}" for k, v in r["overrides"].items()
                                 if k != "method.name") + ")"
    lines.append(f"| {r['number']} | {r['state']} | {value} | {secs} | {params} | {_note(r)} |")
  lines += [""] + markdown_lines(info["provenance"]) + [""]
  return "\n".join(lines)


def plot_best_so_far(trials: list[dict], metric: str, lower: bool, path: str,
                     title: str = "") -> str | None:
  """The best valid score so far against wall-clock minutes since the first
  trial started (a step line), each complete trial a dot. None when no trial
  is complete."""
  import datetime

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from modalimmune_jax.plots import percent_scale
  done = sorted((r for r in trials if r["state"] == "COMPLETE" and r["value"] is not None),
                key=lambda r: r["completed"])
  if not done:
    return None
  t0 = min(datetime.datetime.fromisoformat(r["started"]) for r in trials if r["started"])
  minutes = [(datetime.datetime.fromisoformat(r["completed"]) - t0).total_seconds() / 60
             for r in done]
  scale = percent_scale(metric)
  values = [scale * r["value"] for r in done]
  best, running = [], None
  for v in values:
    running = v if running is None else (min(running, v) if lower else max(running, v))
    best.append(running)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.step([0.0] + minutes, [best[0]] + best, where="post", color="#4C72B0",
          label="best so far")
  ax.plot(minutes, values, "o", color="#DD8452", ms=4, label="trial")
  ax.set_xlabel("wall-clock minutes since the first trial started")
  ax.set_ylabel(f"valid {metric}" + (" (%)" if scale != 1.0 else "") + ", selection score")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  plt.close(fig)
  return path


def write_report(study, workdir: str, info: dict) -> dict:
  """Writes ``tuning.md``, ``tuning.json`` and ``tuning.png`` (each atomically:
  several workers may end together) and returns the JSON."""
  from modalimmune_jax.provenance import provenance
  trials = records(study)
  lower = info["lower_is_better"]
  best = best_record(trials, lower)
  prov = provenance()
  if info["raw_storage"] and info["raw_storage"] != info["storage"]:
    prov["command"] = prov["command"].replace(info["raw_storage"], info["storage"])
  info = dict(info, best=best, provenance=prov,
              best_flags=override_flags(best["overrides"] or {}) if best else [])
  info.pop("raw_storage", None)
  out = dict(info, trials=trials)

  def put(name, text):
    tmp = os.path.join(workdir, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(workdir, name))

  put("tuning.md", render(info, trials))
  put("tuning.json", json.dumps(out, indent=2, default=str))
  tmp = os.path.join(workdir, f".tuning.{os.getpid()}.png")
  if plot_best_so_far(trials, info["metric"], lower, tmp,
                      f"{info['study']}: best valid score so far"):
    os.replace(tmp, os.path.join(workdir, "tuning.png"))
  return out


# ------------------------------------------------------------------ the worker

def _counts(study) -> dict[str, int]:
  from collections import Counter
  return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def _progress(study, trial, target: int, metric: str) -> None:
  """One line on stderr for a finished trial."""
  n_done = sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))
  if trial.user_attrs.get("surplus"):
    print(f"trial {trial.number} not run: the study had {target} trials complete or running",
          file=sys.stderr, flush=True)
    return
  secs = ((trial.datetime_complete - trial.datetime_start).total_seconds()
          if trial.datetime_complete and trial.datetime_start else 0.0)
  params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in trial.params.items())
  if trial.state.name == "COMPLETE":
    try:
      best = study.best_trial
      besttxt = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
      besttxt = ""
    print(f"trial {trial.number} COMPLETE: valid {metric} {trial.value:.4f}, {besttxt}, "
          f"{secs:.1f} s, {n_done}/{target} complete; {params}", file=sys.stderr, flush=True)
  else:
    print(f"trial {trial.number} {trial.state.name} after {secs:.1f} s: "
          f"{trial.user_attrs.get('error', '')}; {params}", file=sys.stderr, flush=True)


def _frozen(study, number: int):
  return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def make_objective(study, storage, base, s: Space, workdir: str, target: int, metric: str):
  """The objective: train the trial's run on valid and return its selection score
  (``storage``: from :func:`open_storage`, whose retry callback re-queues a
  trial stopped by a signal)."""
  from optuna.trial import TrialState

  from modalimmune_jax.protocol import selection_score
  from modalimmune_jax.train import Interrupted, NonFiniteError, run_once

  def objective(trial) -> float:
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    ahead = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number
                for t in trials)
    if done + ahead >= target:
      trial.set_user_attr("surplus", True)
      raise Surplus(f"{done} complete and {ahead} running before it")
    overrides = trial_overrides(s, trial)
    cfg = trial_config(base, overrides)
    # a retry carries the killed trial's run directory (its user attributes are copied)
    run_dir = trial.user_attrs.get("run_dir") or os.path.join(workdir, "trials",
                                                              str(trial.number))
    trial.set_user_attr("run_dir", run_dir)
    trial.set_user_attr("overrides", json.loads(json.dumps(overrides)))
    try:
      record = run_once(cfg, run_dir)
    except Interrupted:
      # SIGTERM / SIGINT: the run saved its checkpoint; queue the trial again so
      # that the next worker resumes it (the heartbeat retries only killed ones)
      storage.get_heartbeat_stale_trial_callback()(study, _frozen(study, trial.number))
      raise
    except NonFiniteError as e:
      trial.set_user_attr("error", f"non-finite: {str(e).splitlines()[0]}")
      raise
    trial.set_user_attr("train_seconds", record.get("train_seconds"))
    return selection_score(record["protocol"], metric)

  return objective


def run_worker(study, objective, target: int, heartbeat: int, progress) -> None:
  """Runs trials until ``study`` holds ``target`` COMPLETE ones (see the module
  docstring: surplus trials, waiting for the trials of other workers)."""
  import warnings

  from modalimmune_jax.train import NonFiniteError
  wait = 0.5
  while True:
    counts = _counts(study)
    if counts["COMPLETE"] >= target:
      return
    errors = sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error"))
    if errors >= target:  # exit 1, as a run stopped on non-finite values
      raise NonFiniteError(f"{errors} trials stopped on non-finite values, as many as "
                           "--trials; no more are started (tuning.md lists them)")
    if counts["COMPLETE"] + counts["RUNNING"] >= target and not counts["WAITING"]:
      # others are running the last trials: poll, 0.5 s at first, then less often
      # (up to one heartbeat), in case one of them dies and its trial is retried
      time.sleep(wait)
      wait = min(2 * wait, heartbeat)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
      continue
    wait = 0.5
    study.optimize(objective, n_trials=1, catch=(Surplus, NonFiniteError),
                   callbacks=[progress], gc_after_trial=False)


def main(argv) -> int:
  del argv
  from modalimmune_jax import cli
  cli.quiet_logging()
  base = FLAGS.config
  s = space(FLAGS.space)
  if FLAGS.sampler == "grid" and FLAGS.trials > grid_size(s):
    raise cli.FlagError(f"--trials={FLAGS.trials} exceeds the {grid_size(s)} points of "
                        f"--space={FLAGS.space}'s grid (--sampler=grid)")
  from modalimmune_jax.config import LOGGING_ONLY, differences, validate_config
  validate_config(base)
  check_space(base, s)
  study_name = FLAGS.study or f"{base.data.name}-{FLAGS.space}"
  workdir = FLAGS.workdir
  default_storage = not FLAGS.storage
  url = FLAGS.storage or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"

  import warnings

  optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  from modalimmune_jax import train
  from modalimmune_jax.metrics import HEADLINE
  from modalimmune_jax.reference import LOWER_IS_BETTER
  if FLAGS.collect:
    if default_storage and not os.path.isfile(os.path.join(workdir, "study.db")):
      raise cli.FlagError(f"--collect: no study in {workdir} (no study.db; --storage?)")
    storage = open_storage(url, FLAGS.heartbeat)
    try:
      study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
      raise cli.FlagError(f"--collect: no study {study_name!r} in {_redacted(url)} (--study?)")
    metric = study.user_attrs.get("metric", HEADLINE["classification"])
    os.makedirs(workdir, exist_ok=True)  # a shared storage, read from another machine
  else:
    dataset = train.load_data(base)  # data checked before anything is created
    metric = HEADLINE[dataset.task]
    # trials/<number> belong to one study: a work directory serves one
    marker = os.path.join(workdir, "study.json")
    mine = {"study": study_name, "storage": _redacted(url)}
    if os.path.isfile(marker):
      with open(marker) as f:
        theirs = json.load(f)
      if theirs.get("study") != study_name:
        raise cli.FlagError(f"--workdir={workdir} holds the trials of study "
                            f"{theirs['study']!r} in {theirs['storage']}, not {study_name!r} in "
                            f"{mine['storage']}; use another --workdir (or that --study)")
    if not default_storage:
      storage = open_storage(url, FLAGS.heartbeat)  # before the work directory exists
    os.makedirs(workdir, exist_ok=True)
    if not os.path.isfile(marker):
      tmp = f"{marker}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(mine, f)
      os.replace(tmp, marker)
    if default_storage:
      storage = open_storage(url, FLAGS.heartbeat)
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                sampler=make_sampler(FLAGS.sampler, s, FLAGS.seed),
                                load_if_exists=True)
    config_json = json.loads(base.to_json_best_effort())
    old = study.user_attrs.get("base_config")
    if old is None:
      # base_config last: a worker that sees it sees the others (each is its own write)
      study.set_user_attr("base_flags", [shlex.quote(a) for a in sys.argv[1:]
                                         if a.startswith("--config.")])
      study.set_user_attr("space", FLAGS.space)
      study.set_user_attr("metric", metric)
      study.set_user_attr("base_config", config_json)
    else:
      if study.user_attrs.get("space") != FLAGS.space:
        raise cli.FlagError(f"--study={study_name} searches --space="
                            f"{study.user_attrs.get('space')}, not {FLAGS.space}")
      diff = differences(old, base, ignore=LOGGING_ONLY)
      if diff:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff[:4])
        raise cli.FlagError(f"--study={study_name} was started with another --config "
                            f"({listed}); use the same config or another --study")
  lower = metric in LOWER_IS_BETTER
  info = {"study": study_name, "space": FLAGS.space, "space_doc": s.doc,
          "sampler": FLAGS.sampler, "seed": FLAGS.seed, "target": FLAGS.trials,
          "metric": metric, "lower_is_better": lower, "storage": _redacted(url),
          "raw_storage": FLAGS.storage,
          "config_arg": FLAGS["config"].serialize().split("=", 1)[-1],
          "base_flags": study.user_attrs.get("base_flags", []),
          "heartbeat_seconds": FLAGS.heartbeat, "grace_seconds": 3 * FLAGS.heartbeat}
  if not FLAGS.collect:
    cli.enable_compile_cache()
    objective = make_objective(study, storage, base, s, workdir, FLAGS.trials, metric)
    progress = lambda st, t: _progress(st, t, FLAGS.trials, metric)  # noqa: E731
    try:
      run_worker(study, objective, FLAGS.trials, FLAGS.heartbeat, progress)
    finally:
      write_report(study, workdir, info)
  else:
    write_report(study, workdir, info)
  counts = _counts(study)
  print(f"{counts['COMPLETE']} of {FLAGS.trials} trials complete; "
        f"{os.path.join(workdir, 'tuning.md')}", file=sys.stderr)
  return 0


def run() -> None:
  from modalimmune_jax import cli
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
