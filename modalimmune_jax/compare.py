"""Methods x seeds under one protocol, in one command.

    python -m modalimmune_jax.compare --config=experiments/configs/mfeat.py \\
        --methods=plain,dropout,modalimmune --seeds=0,1,2 --workdir=runs/cmp

For each method the same tuning budget is spent first: every trial of the
method's search space (its spec's ``search``, :mod:`modalimmune_jax.methods`;
3 trials for every built-in method, one trial of the defaults for a method
without a search space) is trained with the first seed and scored on the **valid** split by the
selection score (the headline metric averaged over the ``full`` condition and
every missing-modality condition); the best trial's settings then train every
seed, evaluated on ``config.eval.split`` (test). The test split never enters a
choice. Every run lives in its own work directory (``tune/<method>/<trial>``,
``<method>/seed<k>``) and resumes or is skipped when already done, so an
interrupted comparison is rerun with the same command. The seeds of a method
train one after the other, reusing the step the tuning trials compiled;
``--together`` trains them as one vmapped program instead
(:func:`modalimmune_jax.train.train_seeds`), each still in its own directory:
a new program to compile, which on a 2-core CPU cost more than it saved
(experiments/README.md, "End to end").

**Across machines**: N workers on one shared ``--workdir`` (a SLURM array task
i of N, say: the same command, only ``--shard`` differs), then one call, on
any machine, that only collects and renders::

    python -m modalimmune_jax.compare --config=... --methods=... --seeds=... \\
        --workdir=SHARED --shard=i/N
    python -m modalimmune_jax.compare --config=... --methods=... --seeds=... \\
        --workdir=SHARED --collect

The work units, in a fixed order (:func:`work_units`): every method's tuning
trials (methods in ``--methods`` order, trials in search order), then every
method's seeds (``--seeds`` order; with ``--together`` a method's seeds are one
unit, one vmapped program as unsharded); worker i runs units i, i + N, i + 2N,
... Each first runs its trials, then its seed runs, a method's as soon as all
its trials are finished by whichever worker: it polls their ``results.json``
every second and recomputes the choice from them, as one machine does. One
command with waiting rather than two phases (tune, then seeds): every array
task runs the same line, the scheduler needs no dependency between two arrays,
and a method's seeds start as soon as its tuning is done. No deadlock: every
worker finishes its own trials before it waits; no duplicate: each unit has one
shard. The first worker writes the plan (``shard_plan.json``: rows, configs,
seeds, tuning, ``--together``); a later worker or ``--collect`` given other
flags is refused naming the difference (:func:`check_plan`). A worker that waits ``--shard_wait`` seconds (a day) with none of the
awaited trials finishing (one killed, say) exits 3 naming them and their
shards; rerun those (they resume). ``--collect`` trains nothing: with runs
missing it exits 2 naming them, else it renders what an unsharded run renders
(same choices, same numbers; provenance and timings aside). Without either
flag, one process trains and renders everything.

Writes ``comparison.md``, ``comparison.json``, ``comparison.png`` and, when the
protocol has cell-eta conditions (``eval.cell_etas``), ``cell_eta.png`` (the
robustness curves, mean ± std over seeds). ``--ablation`` compares a method
(``--ablation_method``, ModalImmune by default) with each part switched off in
turn (its spec's ``ablations``) instead of methods.

* **Tables** (``comparison.md``): mean ± standard deviation over seeds, with
  two linear models beside (:mod:`modalimmune_jax.reference`, fitted on the
  data of the config's ``seed``, skipped with ``--noreference``): the *linear reference*
  (one model on every modality, a removed modality arriving zeroed) and the
  *specialist (linear, refit per subset)*, the reference refitted on each
  subset of modalities with ``C`` chosen on valid per subset, every test sample
  scored by the specialist of the modalities it has under the protocol's own
  mask draws (``eval.seed``, ``eval.draws``); frame-rate and noise conditions
  have no specialist (every modality stays present, degraded). The 63
  subsets of mfeat's 6 views take about 15 s (2-core CPU), so nothing is cached.
* **Paired differences**: every method against ``plain`` and against
  ``dropout`` (those of them in the comparison; an ablation's: its first row),
  per condition and ``mean missing``: the mean over the seeds both have of
  (method - baseline) on the same seed, with a 95 % interval, t over seeds,
  paired by seed (:func:`paired_differences`; no interval with one seed). The
  markdown gives a headline table (full and mean missing, against each
  baseline; in points for accuracy-like metrics, the metric's own units
  otherwise; bold where the interval excludes 0; lower-is-better metrics keep
  the sign method - baseline) and every condition against dropout, with the
  specialist's headroom (specialist - the baseline's mean) beside.
* **The field's metrics** (:func:`field_metrics`): every metric the task's
  papers report (:data:`modalimmune_jax.metrics.FIELD`: MOSI / MOSEI Has0 and
  Non0 Acc-2 and F1, Acc-5, Acc-7, MAE, Corr; IEMOCAP accuracy and F1 per
  emotion), full and mean missing, mean ± std over seeds.
* **Figure** (``comparison.png``, about 7 x 9.5 inches at 150 dpi for mfeat):
  one column per baseline (method - plain, method - dropout), one block per
  condition group (full; drop one; keep one; random missing rates; cell eta;
  sample eta; frame rates; noise; mean missing: those present), each method a
  marker at its mean paired difference with a horizontal bar over its 95 %
  interval (filled where it excludes 0), a vertical line at 0, every block on
  its own x scale in points, the specialist's headroom as a grey tick
  (:func:`modalimmune_jax.plots.plot_paired_differences`).
* **JSON** (``comparison.json``): every number: ``aggregate`` (label ->
  condition -> mean, std, values, seeds), ``paired`` (baseline -> method ->
  condition -> mean, lo, hi, n, seeds; in the metric's stored units,
  accuracies as fractions) with ``paired_how``, ``specialist`` (rows,
  mean_missing, skipped conditions, C per subset, fit seconds), ``headroom``
  (baseline -> condition -> specialist - baseline mean), ``field`` (metric ->
  label -> full / mean missing entries), ``reference``, the
  chosen settings, the validation scores of every trial, the provenance of
  every run.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from modalimmune_jax import methods, protocol
# the finished-run reuse lives in the training package (no flags there), re-exported here
from modalimmune_jax.train.seeds import finished, run_once, run_seeds  # noqa: F401

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (:func:`run`), not on import: the
  library functions here are imported by other commands and experiments, which
  define flags of their own (``tune``'s ``--workdir``, ``--collect``)."""
  if "workdir" in FLAGS:  # defined already (this command's run() called twice)
    return

  flags.DEFINE_string("workdir", None, "Directory for every run and the comparison.")
  flags.DEFINE_list("methods", ["plain", "dropout", "modalimmune"], "Methods to compare.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each trains and evaluates once).")
  flags.DEFINE_bool("tune", True, "Spend the tuning budget (each method's search space) on the "
                    "valid split first.")
  flags.DEFINE_bool("ablation", False, "Compare the ablation rows of --ablation_method instead.")
  flags.DEFINE_string("ablation_method", "modalimmune", "The method whose ablation rows "
                      "(MethodSpec.ablations) --ablation compares.")
  flags.DEFINE_bool("reference", True, "Fit and print the linear reference and the per-subset "
                    "specialists (headroom).")
  flags.DEFINE_bool("together", False, "Train the seeds of a method as one vmapped program "
                    "(train.train_seeds) where the method allows it; per-seed work directories "
                    "either way.")
  flags.DEFINE_string("shard", None, "i/N: be worker i of N on a shared --workdir: train only "
                      "the work units k with k mod N == i (see work_units), render nothing; "
                      "then --collect.")
  flags.DEFINE_bool("collect", False, "Train nothing: render the comparison from the finished "
                    "runs in --workdir (exit 2 naming the missing ones).")
  flags.DEFINE_float("shard_wait", 86400.0, "With --shard: the most seconds a worker waits for "
                     "the other shards' tuning trials with none of them finishing (then exit 3).")
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file (path[:variant]).",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


MISSING_KINDS = protocol.MISSING_KINDS
selection_score = protocol.selection_score


def trial_dir(workdir: str, label: str, trial: int) -> str:
  """The work directory of a tuning trial: ``WORKDIR/tune/<label>/<trial>``."""
  return os.path.join(workdir, "tune", label, str(trial))


def seed_dir(workdir: str, label: str, seed: int) -> str:
  """The work directory of a seed run: ``WORKDIR/<label>/seed<k>`` (an ablation
  row's label up to its parenthesis, spaces as underscores: "no BHGD (fixed
  meta-parameters)" -> ``no_BHGD/seed0``)."""
  return os.path.join(workdir, label.split(" (")[0].replace(" ", "_"), f"seed{seed}")


def trial_configs(config, label: str, seed: int) -> list[tuple[dict, object]]:
  """``(overrides, config)`` of each tuning trial of row ``label`` (its
  :func:`search_space`): ``config`` with the trial's overrides, ``seed`` and
  the valid split."""
  from modalimmune_jax.config import with_overrides
  return [(o, with_overrides(config, dict(o, **{"seed": seed, "eval.split": "valid"})))
          for o in search_space(label)]


def choose(trials: list[tuple[dict, dict]], metric: str) -> dict:
  """The chosen trial of ``(overrides, results.json)`` pairs, in trial order:
  ``{"overrides", "trials": [{"overrides", "score", "seconds_per_step"}]}``,
  the best selection score (the first of equals; lowest for MAE)."""
  entries = [{"overrides": o, "score": selection_score(rec["protocol"], metric),
              "seconds_per_step": seconds_per_step(rec)} for o, rec in trials]
  best = (min if metric == "MAE" else max)(entries, key=lambda t: t["score"])
  return {"overrides": best["overrides"], "trials": entries}


# ---------------------------------------------------------------------------
# Sharding: N workers on one shared --workdir, then --collect.


def parse_shard(value: str) -> tuple[int, int]:
  """``"i/N"`` -> ``(i, N)``, ``0 <= i < N``; else a one-line
  :class:`~modalimmune_jax.cli.FlagError` naming ``--shard``."""
  from modalimmune_jax import cli
  try:
    index, count = (int(part) for part in value.split("/"))
  except ValueError:
    index = count = None
  if index is None or not 0 <= index < count:
    raise cli.FlagError(f"--shard: expected i/N with 0 <= i < N (worker i of N, e.g. "
                        f"--shard=0/4 ... --shard=3/4), got {value!r}")
  return index, count


def work_units(trials: dict[str, int], seeds, together: bool = False) -> list[tuple]:
  """Every run of a comparison in the fixed order shards are dealt from.

  ``trials``: row label -> number of tuning trials (0 without tuning), in the
  rows' order (``--methods`` or the ablation's). First every row's trials
  ``("tune", label, i)`` (rows in order, trials in search-space order), then
  every row's seeds ``("seed", label, (s,))`` (rows in order, seeds in
  ``--seeds`` order); with ``together`` a row's seeds are one unit
  ``("seed", label, tuple(seeds))`` (one vmapped program, as unsharded).
  Shard ``i`` of ``N`` runs units ``i, i + N, i + 2N, ...``
  (:func:`shard_units`), so every worker computes the same plan alone.
  """
  units = [("tune", label, i) for label, n in trials.items() for i in range(n)]
  for label in trials:
    units += ([("seed", label, tuple(seeds))] if together
              else [("seed", label, (s,)) for s in seeds])
  return units


def shard_units(units: list[tuple], index: int, count: int) -> list[tuple]:
  """The units of shard ``index`` of ``count``: every ``count``-th from ``index``."""
  return units[index::count]


PLAN_FILE = "shard_plan.json"


def check_plan(workdir: str, rows: dict, seeds, tuning: bool, together: bool) -> None:
  """Every worker of one shared ``workdir`` must deal the same plan: the first
  to start writes it (``PLAN_FILE``: the rows and their configs, the seeds,
  tuning and ``--together``; created exclusively, so two workers starting at
  once cannot both write), every later worker and ``--collect`` compare theirs
  with it and raise :class:`~modalimmune_jax.cli.FlagError` naming the first
  difference (a worker given other ``--methods``, ``--seeds`` or config flags
  would deal other units, and its runs would silently not be the ones awaited).
  Keys that only change what is logged may differ."""
  from modalimmune_jax import cli
  from modalimmune_jax.config import LOGGING_ONLY, differences
  plan = {"rows": {label: cfg.to_dict() for label, cfg in rows.items()},
          "seeds": [int(x) for x in seeds], "tune": bool(tuning), "together": bool(together)}
  path = os.path.join(workdir, PLAN_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=1, default=str)
  try:
    os.link(tmp, path)  # atomic, and fails if a plan is there already
    return
  except FileExistsError:
    pass
  finally:
    os.remove(tmp)
  with open(path) as f:
    old = json.load(f)
  where = f"{path} (written by the first worker)"
  for key, flag in (("seeds", "--seeds"), ("tune", "--tune"), ("together", "--together")):
    if old[key] != plan[key]:
      raise cli.FlagError(f"{flag} {plan[key]!r} differs from the plan in {where}: "
                          f"{old[key]!r}; give every worker the same flags")
  if list(old["rows"]) != list(plan["rows"]):
    raise cli.FlagError(f"the rows {list(plan['rows'])} (--methods / --ablation) differ from "
                        f"the plan in {where}: {list(old['rows'])}")
  for label, cfg in rows.items():
    diff = differences(old["rows"][label], cfg, ignore=LOGGING_ONLY)
    if diff:
      key, a, b = diff[0]
      raise cli.FlagError(f"config key {key!r} of {label!r} is {b!r} here but {a!r} in the "
                          f"plan in {where}; give every worker the same config and flags")


POLL_SECONDS = 1.0  # how often a worker looks for the other shards' tuning trials


class ShardTimeout(RuntimeError):
  """A worker waited ``--shard_wait`` seconds for other shards' tuning trials,
  none of them finishing."""


def _done(config, workdir: str) -> dict | None:
  """:func:`finished`, quietly; a results.json being written reads as not finished."""
  try:
    return finished(config, workdir, quiet=True)
  except json.JSONDecodeError:
    return None


def _tuned(config, label: str, seeds, workdir: str, metric: str, tuning: bool):
  """``(config with the chosen trial's overrides, [])`` of a row from its
  trials' ``results.json`` in ``workdir`` (:func:`choose`, as an unsharded run
  chooses), or ``(config, unfinished trial dirs)`` while some are missing;
  ``(config, [])`` without tuning."""
  from modalimmune_jax.config import with_overrides
  if not tuning:
    return config, []
  trials = [(o, _done(tc, trial_dir(workdir, label, i)))
            for i, (o, tc) in enumerate(trial_configs(config, label, seeds[0]))]
  missing = [trial_dir(workdir, label, i) for i, (_, rec) in enumerate(trials) if rec is None]
  if missing:
    return config, missing
  return with_overrides(config, choose(trials, metric)["overrides"]), []


def run_shard(rows: dict, seeds, workdir: str, metric: str, *, index: int, count: int,
              tuning: bool = True, together: bool = False, wait_seconds: float = 86400.0,
              poll_seconds: float = POLL_SECONDS) -> list[str]:
  """Worker ``index`` of ``count``: trains its units of :func:`work_units` in
  ``workdir`` (each resumed or skipped when done, like an unsharded run) and
  returns their directories; renders nothing.

  First its tuning trials, waiting for nothing; then its seed runs, a row at a
  time as soon as every trial of that row is finished (by any shard): the
  chosen trial is recomputed from the trials' ``results.json``, exactly as an
  unsharded run chooses. Rows whose trials are not all finished are polled
  every ``poll_seconds``; when none of the awaited trials finishes for
  ``wait_seconds`` (a worker killed, say), :class:`ShardTimeout` names them.
  Every worker finishes its trials before it waits, so no two wait on each
  other, and each unit belongs to exactly one shard, so none is trained twice.
  """
  import time
  units = work_units({label: len(search_space(label)) if tuning else 0 for label in rows},
                     seeds, together)
  mine = shard_units(units, index, count)
  done = []
  for _, label, i in (u for u in mine if u[0] == "tune"):
    _, cfg = trial_configs(rows[label], label, seeds[0])[i]
    run_once(cfg, trial_dir(workdir, label, i))
    done.append(trial_dir(workdir, label, i))
  pending: dict[str, list[int]] = {}
  for _, label, group in (u for u in mine if u[0] == "seed"):
    pending.setdefault(label, []).extend(group)
  shown, since = None, time.monotonic()
  while pending:
    waiting = {}
    for label in list(pending):
      cfg, missing = _tuned(rows[label], label, seeds, workdir, metric, tuning)
      if missing:
        waiting[label] = missing
        continue
      group = pending.pop(label)
      dirs = [seed_dir(workdir, label, s) for s in group]
      run_seeds(cfg, group, dirs, together)
      done += dirs
      since = time.monotonic()  # time spent training is not waiting
    if not waiting:
      continue
    if waiting != shown:  # the first wait, or a trial finished: the clock restarts
      since, shown = time.monotonic(), waiting
      print(f"shard {index}/{count}: waiting for the tuning trials of "
            + "; ".join(f"{label!r} ({_owners(dirs, units, count, workdir)})"
                        for label, dirs in waiting.items()), file=sys.stderr)
    if time.monotonic() - since > wait_seconds:
      dirs = sum(waiting.values(), [])
      raise ShardTimeout(
          f"--shard={index}/{count}: waited {wait_seconds:g} s (--shard_wait) with no tuning "
          f"trial finishing; not finished: {_owners(dirs, units, count, workdir)}; rerun those "
          "shards (they resume), then this one")
    time.sleep(poll_seconds)
  return done


def _owners(dirs: list[str], units: list[tuple], count: int, workdir: str) -> str:
  """``dir (shard j/N), ...``: a few unfinished trial directories and their shards."""
  where = {trial_dir(workdir, label, i): k % count
           for k, (kind, label, i) in enumerate(units) if kind == "tune"}
  return _some([f"{d} (shard {where[d]}/{count})" for d in dirs])


def _some(items: list[str], most: int = 3) -> str:
  """The first ``most`` of ``items``, then how many more."""
  more = f" and {len(items) - most} more" if len(items) > most else ""
  return ", ".join(items[:most]) + more


def missing_runs(rows: dict, seeds, workdir: str, metric: str, tuning: bool) -> list[str]:
  """The work directories of the units not finished yet (:func:`work_units`
  order within each row: its trials, then its seeds); a row's seed runs count as
  missing without a ``results.json`` while its tuning is incomplete."""
  from modalimmune_jax.config import with_overrides
  missing = []
  for label, cfg in rows.items():
    cfg, trials = _tuned(cfg, label, seeds, workdir, metric, tuning)
    missing += trials
    for s in seeds:
      path = seed_dir(workdir, label, s)
      if trials:
        if not os.path.isfile(os.path.join(path, "results.json")):
          missing.append(path)
      elif _done(with_overrides(cfg, {"seed": s}), path) is None:
        missing.append(path)
  return missing


def removal_name(kept) -> str:
  """The protocol's name of the condition that keeps ``kept``."""
  kept = list(kept)
  return kept[0] + " only" if len(kept) == 1 else "+".join(kept)


def dominant_modality(dataset, agg: dict, lower_is_better: bool) -> tuple[str | None, str]:
  """The dominant modality and how it was found: the data set's own (the
  synthetic benchmark's), else the one whose removal alone costs the first
  row's model most (measured, on the evaluated split)."""
  names = list(dataset.modality_names)
  if dataset.meta.get("dominant"):
    return dataset.meta["dominant"], "by construction"
  first = agg[next(iter(agg))]
  without = {m: removal_name([n for n in names if n != m]) for m in names}
  drops = {m: first[c]["mean"] for m, c in without.items() if c in first}
  if not drops:
    return None, ""
  pick = (max if lower_is_better else min)(drops, key=drops.get)
  return pick, f"the removal that costs '{next(iter(agg))}' most"


def aggregate(records: dict[str, list[dict]], metric: str) -> dict:
  """Per label and condition: mean, std, values over seeds and the seed of each
  value (``seeds``: each run's ``config.seed``, else its place); plus the
  missing mean."""
  import numpy as np
  out = {}
  for label, runs in records.items():
    conds = [r["condition"] for r in runs[0]["protocol"]["rows"]]
    kinds = {c["name"]: c["kind"] for c in runs[0]["protocol"]["meta"]["conditions"]}
    seeds = [run.get("config", {}).get("seed", i) for i, run in enumerate(runs)]
    table = {}
    for c in conds:
      vals = [next(r for r in run["protocol"]["rows"] if r["condition"] == c)[metric]
              for run in runs]
      vals = [np.nan if v is None else v for v in vals]
      table[c] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1))
                  if len(vals) > 1 else 0.0, "values": vals, "seeds": seeds, "kind": kinds[c]}
    missing = [c for c in conds if kinds[c] in MISSING_KINDS]
    per_seed = [float(np.mean([table[c]["values"][i] for c in missing]))
                for i in range(len(runs))]
    table["mean missing"] = {"mean": float(np.mean(per_seed)),
                             "std": float(np.std(per_seed, ddof=1)) if len(runs) > 1 else 0.0,
                             "values": per_seed, "seeds": seeds, "kind": "summary"}
    out[label] = table
  return out


# The baselines every method is paired with, where they are compared (the first
# row when neither is: an ablation's full method).
PAIRED_BASELINES = ("plain", "dropout")
LEVEL = 0.95
PAIRED_HOW = "t over seeds, paired by seed"


def paired_interval(diffs, level: float = LEVEL) -> dict:
  """Mean of paired differences and its Student-t interval over them:
  ``{"mean", "lo", "hi", "n"}``, the interval ``mean ± t.ppf((1 + level) / 2,
  n - 1) * sd / sqrt(n)`` (``sd`` with ``ddof=1``); ``lo``/``hi`` None with one
  difference, and ``mean`` too with none.

  Example:
    >>> paired_interval([0.01, 0.03, 0.02])["lo"]   # 0.02 - 4.303 * 0.01 / sqrt(3)
    -0.0048...
  """
  import numpy as np
  from scipy import stats
  d = np.asarray(diffs, np.float64).reshape(-1)
  n = len(d)
  if n == 0:
    return {"mean": None, "lo": None, "hi": None, "n": 0}
  mean = float(d.mean())
  if n == 1:
    return {"mean": mean, "lo": None, "hi": None, "n": 1}
  half = float(stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def _by_seed(entry: dict) -> dict:
  """Seed -> finite value of an aggregate entry (``seeds``, else the places)."""
  import numpy as np
  seeds = entry.get("seeds") or list(range(len(entry["values"])))
  return {s: float(v) for s, v in zip(seeds, entry["values"])
          if v is not None and np.isfinite(v)}


def paired_differences(agg: dict, baseline: str, level: float = LEVEL) -> dict:
  """Every other label's paired difference to ``baseline``: ``{label: {row:
  {"mean", "lo", "hi", "n", "seeds"}}}`` over every row both have (each
  condition and ``mean missing``), the differences ``label - baseline`` on the
  seeds both have a finite value for (:func:`paired_interval`; ``seeds``: the
  ones paired). Lower-is-better metrics keep this sign.

  Example:
    >>> d = paired_differences(aggregate(records, "accuracy"), "plain")["dropout"]["full"]
    >>> d["lo"] > 0   # dropout better than plain on full, 95 % interval excluding 0
  """
  base = agg[baseline]
  out = {}
  for label, table in agg.items():
    if label == baseline:
      continue
    rows = {}
    for row, entry in table.items():
      if row not in base:
        continue
      b, m = _by_seed(base[row]), _by_seed(entry)
      common = [s for s in m if s in b]
      rows[row] = dict(paired_interval([m[s] - b[s] for s in common], level), seeds=common)
    out[label] = rows
  return out


def paired_baselines(labels) -> list[str]:
  """The baselines of :data:`PAIRED_BASELINES` among ``labels``, else the first."""
  labels = list(labels)
  return [b for b in PAIRED_BASELINES if b in labels] or labels[:1]


def condition_groups(conditions: list[dict], num_modalities: int) -> list[tuple[str, list[str]]]:
  """The figure's blocks: ``(group, condition names)`` in the order first met,
  then ``("mean missing", ["mean missing"])``. ``conditions``: the protocol's
  ``meta["conditions"]`` (name, kind, params); removals go to "drop one" (all
  but one kept), "keep one" (one kept; with two modalities both), "keep k of M".
  """
  named = {"full": "full", "random_missing": "random missing rate",
           "cell_missing": "cell eta", "sample_missing": "sample eta",
           "frame_missing": "frame missing rate", "gaussian_noise": "noise"}
  groups: dict[str, list[str]] = {}
  for c in conditions:
    if c["kind"] == "removal":
      kept = (c.get("params") or {}).get("kept") or c["name"].removesuffix(" only").split("+")
      k = len(kept)
      group = ("keep one" if k == 1 else "drop one" if k == num_modalities - 1
               else f"keep {k} of {num_modalities}")
    else:
      group = named.get(c["kind"], c["kind"])
    groups.setdefault(group, []).append(c["name"])
  return list(groups.items()) + [("mean missing", ["mean missing"])]


def specialist_summary(result, metric: str, seed: int, kinds: dict) -> dict:
  """The JSON of a :meth:`~modalimmune_jax.reference.Specialists.evaluate`
  result: ``rows`` (condition -> ``metric``), ``mean_missing`` over the
  missing-modality conditions it has (``mean_missing_over``;
  ``mean_missing_complete``: whether that is every one the methods' mean
  covers), ``skipped`` (condition -> why), ``C`` per subset, ``subsets`` fitted,
  ``fit_seconds`` in all, ``seed`` of the data."""
  rows = {n: v[metric] for n, v in result.rows}
  over = [n for n in rows if kinds[n] in MISSING_KINDS]
  missing_all = [n for n, k in kinds.items() if k in MISSING_KINDS]
  model = result.meta["model"]
  return {"rows": rows,
          "mean_missing": float(sum(rows[n] for n in over) / len(over)) if over else None,
          "mean_missing_over": over, "mean_missing_complete": len(over) == len(missing_all),
          "skipped": result.meta["skipped"], "C": model["C"], "subsets": len(model["C"]),
          "fit_seconds": float(sum(model["seconds"].values())), "seed": seed}


def headroom(agg: dict, specialist: dict | None, baselines) -> dict:
  """``{baseline: {row: specialist - the baseline's mean}}`` for every row the
  specialist has (``mean missing`` only when it covers every condition)."""
  if not specialist:
    return {}
  rows = dict(specialist["rows"])
  if specialist["mean_missing_complete"] and specialist["mean_missing"] is not None:
    rows["mean missing"] = specialist["mean_missing"]
  return {b: {r: v - agg[b][r]["mean"] for r, v in rows.items() if r in agg[b]}
          for b in baselines}


def _label(row: str) -> str:
  """How tables mark a method's row (a reimplementation, say); "" for others."""
  return methods.get(row).label if row in methods.names() else ""


def search_space(name: str) -> tuple[dict, ...]:
  """The tuning trials of method ``name``: its spec's ``search``, or one trial of
  its defaults when it has none."""
  return tuple(methods.get(name).search) or ({},)


def mean_std_cell(entry: dict, scale: float, digits: int = 2) -> str:
  """``98.55 ± 0.51``: an aggregate entry's mean ± std, times ``scale``."""
  return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['std']:.{digits}f}"


FIELD_ROWS = ("full", "mean missing")


def field_metrics(records: dict[str, list[dict]]) -> dict:
  """The field's metrics (:data:`modalimmune_jax.metrics.FIELD` of the runs'
  task, those the runs have) under ``full`` and the missing mean: per metric,
  :func:`aggregate`'s entries for those two rows."""
  from modalimmune_jax.metrics import FIELD
  first = next(iter(records.values()))[0]
  have = first["protocol"]["rows"][0]
  names = [m for m in FIELD.get(first.get("task"), ()) if m in have]
  return {"task": first.get("task"), "metrics": names,
          "aggregate": {m: {label: {row: t[row] for row in FIELD_ROWS}
                            for label, t in aggregate(records, m).items()} for m in names}}


def render_field(field: dict, seeds) -> list[str]:
  """Markdown tables of :func:`field_metrics`: one per row (full, mean missing),
  methods down, metrics across, mean ± std over seeds."""
  from modalimmune_jax.plots import percent_scale
  names = field["metrics"]
  if not names:
    return []
  labels = list(field["aggregate"][names[0]])
  lines = ["", f"The field's metrics ({field['task']}; accuracies and F1 in %, MAE and Corr "
           f"as they are), mean ± standard deviation over seeds {list(seeds)}:"]
  for row in FIELD_ROWS:
    lines += ["", f"*{row}*", "", "| method | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for label in labels:
      cells = [mean_std_cell(field["aggregate"][m][label][row], percent_scale(m),
                             2 if percent_scale(m) != 1.0 else 3) for m in names]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


_MINUS = "\u2212"


def _signed(x: float, digits: int = 2) -> str:
  """``+0.42`` / ``\u22120.10`` (a typographic minus; a rounded zero is +0.00)."""
  x = 0.0 if abs(x) < 0.5 * 10.0 ** -digits else x
  return f"{x:+.{digits}f}".replace("-", _MINUS)


def paired_cell(entry: dict | None, scale: float, num_seeds: int) -> str:
  """``+0.42 [−0.10, +0.94]``, bold where the interval excludes 0, ``(n=k)``
  where fewer seeds than the comparison's were paired."""
  if not entry or entry["mean"] is None:
    return "n/a"
  text = _signed(scale * entry["mean"])
  lo, hi = entry["lo"], entry["hi"]
  if lo is not None:
    text += f" [{_signed(scale * lo)}, {_signed(scale * hi)}]"
    if lo > 0 or hi < 0:
      text = f"**{text}**"
  return text + (f" (n={entry['n']})" if entry["n"] != num_seeds else "")


SPECIALIST = "specialist (linear, refit per subset)"


def _paired_tables(agg: dict, metric: str, paired: dict, room: dict, specialist: dict | None,
                   num_seeds: int) -> list[str]:
  """The markdown of the paired differences: the headline table (every method x
  {full, mean missing} x baseline) and every condition against dropout (or the
  first baseline)."""
  from modalimmune_jax.plots import percent_scale
  from modalimmune_jax.reference import LOWER_IS_BETTER
  scale = percent_scale(metric)
  unit = "percentage points" if scale != 1.0 else f"{metric}'s own units"
  labels, bases = list(agg), list(paired)
  head = ["full", "mean missing"]
  lines = ["", "## Paired differences", "",
           f"Method − baseline on the same seed, averaged over the seeds both have, with a "
           f"{100 * LEVEL:g} % confidence interval: {PAIRED_HOW} (mean ± t(0.975, n−1) · sd / "
           f"√n; no interval with one seed), in {unit}. **Bold**: the interval excludes 0; "
           "(n=k): only k seeds in common."
           + (f" {metric} is lower-is-better: the sign stays method − baseline, so a negative "
              "difference favours the method." if metric in LOWER_IS_BETTER else "")
           + (f" '{SPECIALIST}': the specialist's score minus the baseline's mean over seeds "
              "(one fit, no interval): the headroom." if specialist else ""), "",
           "| method | " + " | ".join(f"{c} − {b}" for b in bases for c in head) + " |",
           "|---|" + "---:|" * (len(head) * len(bases))]
  for label in labels:
    cells = ["—" if label == b else paired_cell(paired[b][label].get(c), scale, num_seeds)
             for b in bases for c in head]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if room:
    cells = [_signed(scale * room[b][c]) if c in room[b] else "" for b in bases for c in head]
    lines.append(f"| {SPECIALIST} | " + " | ".join(cells) + " |")
  base = "dropout" if "dropout" in bases else bases[0]
  others = [lab for lab in labels if lab != base]
  rows = [c for c in agg[base] if c != "mean missing"] + ["mean missing"]
  lines += ["", f"Every condition, method − {base} ({unit}, {100 * LEVEL:g} % interval, "
            f"{PAIRED_HOW})" + (f"; last column: the specialist's headroom over {base} "
                                f"(specialist − {base}'s mean)" if room else "") + ":", "",
            "| condition | " + " | ".join(others) + (f" | specialist − {base}" if room else "")
            + " |", "|---|" + "---:|" * (len(others) + bool(room))]
  for c in rows:
    cells = [paired_cell(paired[base][lab].get(c), scale, num_seeds) for lab in others]
    if room:
      cells.append(_signed(scale * room[base][c]) if c in room[base] else "")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return lines


def render(agg: dict, metric: str, *, title: str, dominant: str | None,
           reference: dict | None, runs_info: dict, chosen: dict,
           costs: dict | None = None, specialist: dict | None = None,
           paired: dict | None = None, room: dict | None = None,
           field: dict | None = None) -> str:
  """``comparison.md``: the headline table (mean ± std over seeds, the linear
  reference and the specialist beside), the paired differences
  (:func:`paired_differences`) when ``paired``, the field's metrics
  (:func:`field_metrics`) when ``field``, every condition, the tuning and the
  step costs. ``room``: :func:`headroom`."""
  from modalimmune_jax.plots import percent_scale
  labels = list(agg)
  first = agg[labels[0]]
  conds = [c for c in first if c != "mean missing"]
  scale = percent_scale(metric)
  unit = "" if scale == 1.0 else " (%)"
  drop_dom = None
  if dominant is not None:
    name = removal_name([m for m in runs_info["modalities"] if m != dominant])
    drop_dom = name if name in first else None
  head = ["full", "mean missing"] + ([drop_dom] if drop_dom else [])
  lines = [f"# {title}", "", f"{metric}{unit}, mean ± standard deviation over seeds "
           f"{runs_info['seeds']}, {runs_info['split']} split. 'mean missing': the mean over "
           "every missing-modality condition (removals, random missing rates, cell- and "
           "sample-eta rates, frame rates; not noise)."
           + (f" Dominant modality: {dominant}, {runs_info['dominant_how']} "
              f"(removed in '{drop_dom}')." if drop_dom else ""), "",
           "| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
  for label in labels:
    shown = f"{label} ({_label(label)})" if _label(label) else label
    lines.append(f"| {shown} | "
                 + " | ".join(mean_std_cell(agg[label][c], scale) for c in head) + " |")
  if reference is not None:
    ref = reference["rows"]
    ref_missing = reference["mean_missing"]
    cells = [f"{scale * ref['full']:.2f}", f"{scale * ref_missing:.2f}"]
    if drop_dom:
      cells.append(f"{scale * ref[drop_dom]:.2f}")
    lines.append(f"| linear reference (seed-{reference['seed']} data, C={reference['C']:g}) | "
                 + " | ".join(cells) + " |")
  partial = specialist is not None and not specialist["mean_missing_complete"]
  if specialist is not None:
    spec = specialist["rows"]
    value = lambda v: "" if v is None else f"{scale * v:.2f}"
    cells = [value(spec.get("full")),
             value(specialist["mean_missing"]) + ("†" if partial else "")]
    if drop_dom:
      cells.append(value(spec.get(drop_dom)))
    lines.append(f"| {SPECIALIST[:-1]}; seed-{specialist['seed']} data) | "
                 + " | ".join(cells) + " |")
    lines += ["", f"{SPECIALIST}: the linear reference refitted on each subset of modalities "
              "(C chosen on valid for each subset, from the same grid); under a condition "
              "every test sample is scored by the specialist of exactly the modalities it "
              "has, under the protocol's own masks (eval.seed, draws): removals by their "
              "subset's specialist, random conditions sample by sample. "
              f"{specialist['subsets']} subsets fitted, {specialist['fit_seconds']:.1f} s."
              + (" No specialist for frame-rate and noise conditions (left blank): every "
                 "modality stays present there, degraded, so no subset's model applies."
                 if specialist["skipped"] else "")
              + (f" †: its mean over the {len(specialist['mean_missing_over'])} missing-"
                 "modality conditions it has (the frame-rate conditions have none), not "
                 "comparable with the methods' mean missing." if partial else "")]
  if paired:
    lines += _paired_tables(agg, metric, paired, room or {}, specialist,
                            len(runs_info["seeds"]))
  if field:
    lines += render_field(field, runs_info["seeds"])
  spec_rows = (specialist or {}).get("rows", {})
  lines += ["", "Every condition:", "", "| condition | " + " | ".join(labels)
            + (" | specialist" if specialist else "") + " |",
            "|---|" + "---:|" * (len(labels) + bool(specialist))]
  for c in conds + ["mean missing"]:
    cells = [mean_std_cell(agg[lab][c], scale) for lab in labels]
    if specialist:
      v = specialist["mean_missing"] if c == "mean missing" else spec_rows.get(c)
      cells.append("" if v is None else f"{scale * v:.2f}"
                   + ("†" if partial and c == "mean missing" else ""))
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  if chosen:
    lines += ["", "Tuning (same budget per method, first seed, valid split, selection score ="
              " mean headline metric over full + missing conditions):", ""]
    for label, info in chosen.items():
      trials = "; ".join(f"{json.dumps(t['overrides'])} -> {scale * t['score']:.2f}"
                         for t in info["trials"])
      lines.append(f"- {label}: chose {json.dumps(info['overrides'])} ({trials})")
  if costs:
    lines += ["", "Training cost per step (median over the method's tuning trials: single-seed "
              "runs in this process, wall time after the first step, logging and validation "
              "included):", "", "| method | ms per step | relative to plain |", "|---|---:|---:|"]
    for label, c in costs.items():
      rel = "" if c["relative_to_plain"] is None else f"{c['relative_to_plain']:.2f}x"
      lines.append(f"| {label} | {1e3 * c['seconds_per_step']:.2f} | {rel} |")
  lines += ["", f"- command: `{runs_info['command']}`",
            f"- commit: {runs_info['commit']}{' (dirty)' if runs_info['dirty'] else ''}",
            f"- machine: {runs_info['machine']}", ""]
  return "\n".join(lines)


def seconds_per_step(record: dict) -> float | None:
  """A run's training seconds per step after its first (compilation excluded)."""
  steps = record["steps"] - record["start_step"] - 1
  if steps < 1 or record.get("first_step_seconds") is None or record.get("seeds_together"):
    return None
  return (record["train_seconds"] - record["first_step_seconds"]) / steps


def step_costs(chosen: dict) -> dict:
  """Per method: the median seconds per step over its tuning trials (single-seed
  runs, one after another in one process) and the ratio to plain's."""
  import numpy as np
  med = {label: float(np.median(v)) for label, info in chosen.items()
         if (v := [t["seconds_per_step"] for t in info["trials"]
                   if t.get("seconds_per_step") is not None])}
  base = med.get("plain")
  return {label: {"seconds_per_step": m, "relative_to_plain": m / base if base else None}
          for label, m in med.items()}


def cell_eta_curves(agg: dict, records: dict[str, list[dict]]) -> dict:
  """Per label, the headline metric against cell-eta (CPM-Net/GCNet), ``full`` at
  eta 0: ``{label: {"x", "mean", "std"}}`` (empty without cell-eta conditions)."""
  conds = next(iter(records.values()))[0]["protocol"]["meta"]["conditions"]
  etas = sorted((c["params"]["eta"], c["name"]) for c in conds if c["kind"] == "cell_missing")
  if not etas:
    return {}
  points = [(0.0, "full")] + etas
  return {label: {"x": [x for x, _ in points],
                  "mean": [table[name]["mean"] for _, name in points],
                  "std": [table[name]["std"] for _, name in points]}
          for label, table in agg.items()}


def main(argv) -> int:
  del argv
  import time
  started = time.perf_counter()
  from modalimmune_jax import cli
  cli.quiet_logging()
  from modalimmune_jax.config import validate_config, with_overrides
  base = FLAGS.config
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise cli.FlagError(f"--seeds must be integers, got {FLAGS.seeds}")
  shard = None if FLAGS.shard is None else parse_shard(FLAGS.shard)
  if shard is not None and FLAGS.collect:
    raise cli.FlagError("--collect with --shard: the workers train (--shard=i/N), the final "
                        "call collects (--collect alone)")
  if not FLAGS.shard_wait > 0:
    raise cli.FlagError(f"--shard_wait: seconds > 0, got {FLAGS.shard_wait}")
  known = methods.names()
  if FLAGS.ablation:
    if FLAGS.ablation_method not in known or not methods.get(FLAGS.ablation_method).ablations:
      raise cli.FlagError(f"--ablation_method: {FLAGS.ablation_method!r} has no ablation rows; "
                          f"methods with them: "
                          f"{[n for n in known if methods.get(n).ablations]}")
    name = FLAGS.ablation_method
    rows = {label: with_overrides(base, dict(o, **{"method.name": name}))
            for label, o in methods.get(name).ablations.items()}
  else:
    unknown = [m for m in FLAGS.methods if m not in known]
    if unknown:
      raise cli.FlagError(f"--methods: unknown {unknown}; known {list(known)} (a method of "
                          "your own: register its spec in your config file)")
    rows = {m: with_overrides(base, {"method.name": m}) for m in FLAGS.methods}
  rows = {label: with_overrides(cfg, {"train.seeds": ()}) for label, cfg in rows.items()}
  for label, cfg in rows.items():
    validate_config(cfg)

  from modalimmune_jax import train
  from modalimmune_jax.metrics import HEADLINE
  from modalimmune_jax.provenance import provenance
  dataset = train.load_data(base)  # data checked before anything is created
  metric = HEADLINE[dataset.task]
  tuning = FLAGS.tune and not FLAGS.ablation
  if FLAGS.collect:  # trains nothing: every unit must be finished
    missing = missing_runs(rows, seeds, FLAGS.workdir, metric, tuning)
    if missing:
      raise cli.FlagError(f"--collect: {len(missing)} run(s) not finished: {_some(missing)} "
                          "(run every --shard=i/N worker first; they resume)")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if shard is not None or FLAGS.collect:
    check_plan(FLAGS.workdir, rows, seeds, tuning, FLAGS.together)
  cli.enable_compile_cache()
  if shard is not None:
    try:
      done = run_shard(rows, seeds, FLAGS.workdir, metric, index=shard[0], count=shard[1],
                       tuning=tuning, together=FLAGS.together, wait_seconds=FLAGS.shard_wait)
    except ShardTimeout as e:
      print(f"error: {e}", file=sys.stderr)
      return 3
    print(f"shard {shard[0]}/{shard[1]}: {len(done)} run(s) done in {FLAGS.workdir}; render "
          "the comparison with --collect once every shard is done", file=sys.stderr)
    return 0

  chosen: dict[str, dict] = {}
  if tuning:
    for label, cfg in rows.items():
      trials = [(o, run_once(tc, trial_dir(FLAGS.workdir, label, i)))
                for i, (o, tc) in enumerate(trial_configs(cfg, label, seeds[0]))]
      chosen[label] = choose(trials, metric)
      rows[label] = with_overrides(cfg, chosen[label]["overrides"])

  records: dict[str, list[dict]] = {}
  for label, cfg in rows.items():
    records[label] = run_seeds(cfg, seeds, [seed_dir(FLAGS.workdir, label, s) for s in seeds],
                               FLAGS.together)

  agg = aggregate(records, metric)
  reference = specialist = None
  if FLAGS.reference:
    from modalimmune_jax.reference import Specialists, fit_linear_reference
    ref = fit_linear_reference(dataset)
    split = dataset.splits[base.eval.split]
    conds = train.eval_conditions(base, dataset.modality_names)
    result = ref.evaluate(split, conds, seed=base.eval.seed)
    rows_ref = {n: v[metric] for n, v in result.rows}
    kinds = {c.name: c.kind for c in conds}
    missing = [rows_ref[n] for n in rows_ref if kinds[n] in MISSING_KINDS]
    reference = {"C": ref.C, "seed": base.seed, "valid_score": ref.valid_score, "rows": rows_ref,
                 "mean_missing": float(sum(missing) / max(len(missing), 1))}
    # the all-modality specialist is the reference just fitted (same grid and seed)
    specialist = specialist_summary(Specialists(dataset, reference=ref).evaluate(
        split, conds, seed=base.eval.seed), metric, base.seed, kinds)
  bases = paired_baselines(agg)
  paired = {b: paired_differences(agg, b) for b in bases}
  room = headroom(agg, specialist, bases)
  groups = condition_groups(next(iter(records.values()))[0]["protocol"]["meta"]["conditions"],
                            len(dataset.modality_names))
  prov = provenance(seeds=seeds)
  info = {"seeds": seeds, "split": base.eval.split, "command": prov["command"],
          "commit": prov["commit"], "dirty": prov["dirty"],
          "machine": f"{prov['machine']['processor']}, {prov['machine']['cpu_count']} cores, "
                     f"{prov['machine']['jax_backend']}",
          "modalities": list(dataset.modality_names)}
  kind = f"{FLAGS.ablation_method} ablation" if FLAGS.ablation else "Comparison"
  title = f"{kind} on {dataset.name}"
  dominant, info["dominant_how"] = dominant_modality(dataset, agg, metric == "MAE")
  costs = step_costs(chosen)
  field = field_metrics(records)
  md = render(agg, metric, title=title, dominant=dominant, reference=reference,
              runs_info=info, chosen=chosen, costs=costs, specialist=specialist,
              paired=paired, room=room, field=field)
  from modalimmune_jax.reference import LOWER_IS_BETTER
  out = {"metric": metric, "title": title, "aggregate": agg,
         "paired": paired,
         "paired_how": {"difference": "method - baseline on the same seed, mean over the "
                                      "seeds both have (seeds: those paired)",
                        "interval": f"{100 * LEVEL:g}% Student t over seeds, paired by seed: "
                                    "mean ± t.ppf(0.975, n-1) * sd / sqrt(n) (sd ddof=1); "
                                    "lo/hi null with one seed",
                        "units": f"{metric} as stored (accuracies as fractions)",
                        "lower_is_better": metric in LOWER_IS_BETTER},
         "specialist": specialist, "headroom": room, "field": field,
         "chosen": chosen,
         "step_costs": costs, "together": FLAGS.together,
         "wall_seconds": time.perf_counter() - started,
         "dominant": dominant, "dominant_how": info["dominant_how"],
         "reference": reference, "provenance": prov,
         "runs": {label: [{"workdir": seed_dir(FLAGS.workdir, label, s), "seed": s,
                           "provenance": r["provenance"], "config": r["config"],
                           "train_seconds": r["train_seconds"]}
                          for s, r in zip(seeds, recs)] for label, recs in records.items()}}
  with open(os.path.join(FLAGS.workdir, "comparison.md"), "w") as f:
    f.write(md)
  with open(os.path.join(FLAGS.workdir, "comparison.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  from modalimmune_jax.plots import plot_paired_differences
  plot_paired_differences(paired, metric, os.path.join(FLAGS.workdir, "comparison.png"),
                          f"{title}: paired differences, seeds {seeds}", groups,
                          headroom=room, level=LEVEL, methods=list(agg))
  curves = cell_eta_curves(agg, records)
  if curves:
    from modalimmune_jax.plots import robustness_curves
    robustness_curves(curves, metric, os.path.join(FLAGS.workdir, "cell_eta.png"),
                      f"{title}: cell-eta (CPM-Net/GCNet), mean ± std over seeds {seeds}")
  print(md)
  return 0


def run() -> None:
  from modalimmune_jax import cli
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
