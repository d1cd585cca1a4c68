"""What every script under ``experiments/`` shares: config loading, the
``--out`` default, logging, provenance of result files, run directories and
the timing loop.

A script starts with ``from harness import ...`` (Python puts a script's own
folder on ``sys.path``); tests load scripts by path and call their ``main``.
No script imports another script, ``tests/`` or a private name of the library.

Example (a script's skeleton)::

    from harness import get_config, log, parser, write_results

    def main(argv=None) -> int:
      args = parser(__doc__, "my_experiment").parse_args(argv)
      config = get_config("mfeat", "smoke" if args.quick else "")
      log("training ...")
      record = {...}
      write_results(args.out, "my_experiment", record, markdown_lines)
      return 0

    if __name__ == "__main__":
      raise SystemExit(main())
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from math import lcm
from typing import Any, Callable, Iterable, NamedTuple, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(HERE, "configs")
RESULTS = os.path.join(HERE, "results")
QUICK_RESULTS = os.path.join(ROOT, "runs", "quick")  # git-ignored

__all__ = ["HERE", "ROOT", "CONFIGS", "RESULTS", "QUICK_RESULTS", "config_module",
           "get_config", "run_config", "bench_config", "log", "default_out", "parser",
           "find_runs", "write_results", "restore", "train_logs", "copy_tree", "host_steps",
           "device_inputs", "Timed", "no_gc", "timed_steps", "step_rate", "time_calls",
           "loop_steps_per_s", "alternate", "Workload", "bench_workloads", "mosi_settings",
           "amortising_window", "workload_flags", "window_inputs", "compile_periodic",
           "time_windows"]

_T0 = time.perf_counter()


# ----------------------------------------------------------------- configs ----

def config_module(name: str):
  """``experiments/configs/<name>.py`` as a module (loaded by path, as
  ``--config=`` does)."""
  path = os.path.join(CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config")
  spec = importlib.util.spec_from_file_location(f"experiment_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, variant: str = "", validate: bool = True,
               overrides: dict | None = None):
  """``experiments/configs/<name>.py``'s ``get_config(variant)`` with dotted
  ``overrides`` (``{"method.name": "ebr"}``), validated unless ``validate`` is
  false (a pickle data set's config has no data path)."""
  from modalimmune_jax.config import validate_config, with_overrides
  config = with_overrides(config_module(name).get_config(variant), overrides or {})
  if validate:
    validate_config(config)
  return config


def run_config(run_dir: str):
  """The config a run of ``train_and_evaluate`` trained with (its
  ``config.json``) over ``base_config()``: keys added since take their
  defaults; JSON lists become tuples."""
  from modalimmune_jax.config import base_config, flatten, with_overrides
  with open(os.path.join(run_dir, "config.json")) as f:
    saved = flatten(json.load(f))
  return with_overrides(base_config(), {k: tuple(v) if isinstance(v, list) else v
                                        for k, v in saved.items()})


def bench_config(config, steps: int, method: str):
  """``config`` trained ``steps`` steps of ``method`` as a benchmark: no
  checkpoints, no validation, only the ``full`` condition evaluated."""
  from modalimmune_jax.config import with_overrides
  return with_overrides(config, {
      "method.name": method, "train.steps": steps,
      "train.log_every": 50 if steps >= 200 else max(steps // 4, 1),
      "train.eval_every": 0, "checkpoint.enabled": False, "eval.removals": "none",
      "eval.missing_rates": (), "eval.snrs_db": (), "eval.frame_rates": ()})


# ------------------------------------------------------ command line, output ----

def log(message: str) -> None:
  """A progress line on stderr: wall-clock time and seconds since the start."""
  print(f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - _T0:7.1f} s] {message}",
        file=sys.stderr, flush=True)


def default_out(name: str, quick: bool = False) -> str:
  """``experiments/results/<name>``, where a script's committed results live;
  ``runs/quick/<name>`` (git-ignored) for a ``--quick`` run, so that a smoke
  run never overwrites a committed result."""
  return os.path.join(QUICK_RESULTS if quick else RESULTS, name)


class _Parser(argparse.ArgumentParser):
  """Fills in ``--out`` once ``--quick`` is known. A ``--quick`` run also
  turns XLA's CPU optimisations off (``provenance.quick_compile_xla_flags``,
  for the backend not started yet, and the subprocesses): compilation is most of a smoke run, its timings mean
  nothing."""

  def parse_known_args(self, args=None, namespace=None):  # parse_args comes through here
    ns, extra = super().parse_known_args(args, namespace)
    quick = getattr(ns, "quick", False)
    if ns.out is None:
      ns.out = default_out(self.result_name, quick)
    if quick:
      from modalimmune_jax.provenance import quick_compile_xla_flags
      os.environ["XLA_FLAGS"] = quick_compile_xla_flags(os.environ.get("XLA_FLAGS", ""))
    return ns, extra


def parser(description: str | None, name: str, quick: bool = True,
           runs: bool = False) -> argparse.ArgumentParser:
  """An argument parser with the shared flags: ``--out DIR`` (default
  :func:`default_out`), with ``quick`` a ``--quick`` flag (the smallest
  sizes, a couple of minutes at most), with ``runs`` the positional
  ``RUN_DIR ...`` of the scripts that read run directories."""
  p = _Parser(description=description,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.result_name = name
  if runs:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or directories to search recursively")
  p.add_argument("--out", metavar="DIR", default=None,
                 help=f"directory for the result files (default: experiments/results/{name}"
                 + (f"; with --quick: runs/quick/{name}" if quick else "") + ")")
  if quick:
    p.add_argument("--quick", action="store_true",
                   help="the smallest sizes (a smoke run: minutes at most)")
  return p


def find_runs(paths: Iterable[str], is_run: Callable[[str], bool]) -> list[str]:
  """The directories among ``paths`` and below them (``checkpoints/`` skipped)
  for which ``is_run(dir)`` holds, sorted, without repeats."""
  runs = []
  for path in paths:
    path = os.path.abspath(path)
    if not os.path.isdir(path):
      raise SystemExit(f"error: {path} is not a directory")
    for root, dirs, _ in os.walk(path):
      dirs[:] = sorted(d for d in dirs if d != "checkpoints")
      if is_run(root):
        runs.append(root)
  return sorted(dict.fromkeys(runs))


def write_results(out: str, name: str, record: dict, markdown: Sequence[str] = (),
                  title: str | None = None, details: Sequence[str] = (),
                  prov: dict | None = None, **provenance_fields) -> dict:
  """Writes ``OUT/<name>.json`` (``record`` plus its provenance: command,
  commit, machine and ``provenance_fields`` such as seeds, or ``prov`` made
  before) and, given ``markdown`` lines, ``OUT/<name>.md`` headed by the same
  provenance (``details`` join its machine line). Returns the provenance."""
  from modalimmune_jax.provenance import markdown_lines, provenance
  prov = prov or provenance(**provenance_fields)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(dict(record, provenance=prov), f, indent=2, default=float)
  if markdown:
    head = [f"# {title}", ""] if title else []
    with open(os.path.join(out, f"{name}.md"), "w") as f:
      f.write("\n".join(head + markdown_lines(prov, *details) + [""] + list(markdown))
              .rstrip("\n") + "\n")
  log(f"wrote {os.path.join(out, name)}.json" + (" and .md" if markdown else ""))
  return prov


# ---------------------------------------------------------- run directories ----

def restore(config, run_dir: str):
  """``(setup, step, state)``: :func:`modalimmune_jax.train.setup` of ``config``
  on one device and the newest good checkpoint of ``run_dir`` (None if none)."""
  import jax
  from modalimmune_jax import train
  from modalimmune_jax.checkpoint import Checkpointer
  run = train.setup(config, num_devices=1)
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), config.checkpoint.max_to_keep)
  try:
    restored = ckpt.restore_latest(run.state, jax.random.key(0))
  finally:
    ckpt.close()
  if restored is None:
    return run, None, None
  step, state, _, _ = restored
  return run, step, state


def train_logs(workdir: str) -> list[dict]:
  """The train records of a run's ``metrics.jsonl`` (one per ``train.log_every``)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"split": "train"' in line]


# ------------------------------------------------------------------ timing ----

def copy_tree(tree):
  """A copy of a train state (the step donates its input)."""
  import jax
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def host_steps(run, state, rng, steps: Iterable[int], timed: bool = False):
  """``run.step_fn`` over the step numbers ``steps`` on the training loop's
  host batches, keys ``fold_in(rng, s)``: ``(state, metrics, seconds)``. With
  ``timed`` each step is waited for and ``seconds`` lists their wall times
  (the first call compiles); else ``seconds`` is empty."""
  import jax
  from modalimmune_jax.step import shard_batch
  seconds, metrics = [], None
  for s in steps:
    t0 = time.perf_counter()
    state, metrics = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                                 jax.random.fold_in(rng, s), s)
    if timed:
      jax.block_until_ready((state, metrics))
      seconds.append(time.perf_counter() - t0)
  return jax.block_until_ready(state), metrics, seconds


def device_inputs(run, steps: Iterable[int], rng) -> list[tuple]:
  """``(batch, key, step)`` of each step number, batch and key already on the
  device (the step number tells ``run.step_fn`` which periodic programs fire)."""
  import jax
  from modalimmune_jax.step import shard_batch
  return [(*jax.block_until_ready((shard_batch(run.batches(s), run.mesh),
                                   jax.random.fold_in(rng, s))), s) for s in steps]


class Timed(NamedTuple):
  seconds: float  # wall time of all the steps
  cpu_seconds: float  # this process's CPU time over them
  state: Any
  metrics: Any


@contextlib.contextmanager
def no_gc():
  """Python's garbage collector collected before and off within (as ``timeit``
  does). A benchmark process holds every method's traced and compiled programs,
  and a full collection over them took about 0.45 s on this machine: one landing
  in a 100-step window of plain's mfeat step (about 4 ms a step) doubled its
  time; which windows it hit changed from run to run (issue 17)."""
  gc.collect()
  was_on = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_on:
      gc.enable()


def timed_steps(step_fn, state, inputs: Iterable[tuple]) -> Timed:
  """The timing loop: ``step_fn(state, *inputs[i])`` (``(batch, key)`` or
  ``(batch, key, step)``, usually already on the device), one
  ``block_until_ready`` at the end, the garbage collector off (:func:`no_gc`)."""
  import jax
  with no_gc():
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = None
    for args in inputs:
      state, metrics = step_fn(state, *args)
    jax.block_until_ready((state, metrics))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
  return Timed(seconds, cpu_seconds, state, metrics)


def step_rate(run, steps: int) -> float:
  """Steps/s of ``run.step_fn`` on one batch already on the device (keys
  ``fold_in(key(0), s)``), after a first, compiling step; from a copy of
  ``run.state``."""
  import jax
  from modalimmune_jax.step import shard_batch
  rng, batch = jax.random.key(0), shard_batch(run.batches(0), run.mesh)
  state = timed_steps(run.step_fn, copy_tree(run.state), [(batch, rng, 0)]).state
  timed = timed_steps(run.step_fn, state,
                      ((batch, jax.random.fold_in(rng, s), s) for s in range(1, steps + 1)))
  return steps / timed.seconds


def time_calls(fn, args: Sequence, calls: int = 1, repeats: int = 3) -> float:
  """Median seconds per call of ``fn(*args)`` (called once first, to compile)
  over ``repeats`` timings of ``calls`` calls each."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    with no_gc():
      t0 = time.perf_counter()
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
      times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def loop_steps_per_s(config) -> float:
  """Steps/s of ``train.train_and_evaluate(config)`` itself (in a scratch
  directory), from its ``metrics.jsonl`` timestamps after the first record
  (compilation excluded)."""
  from modalimmune_jax import train
  workdir = tempfile.mkdtemp(prefix="bench-loop-")
  try:
    train.train_and_evaluate(config, workdir)
    logs = train_logs(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return (logs[-1]["step"] - logs[0]["step"]) / (logs[-1]["seconds"] - logs[0]["seconds"])


def alternate(jobs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
  """Runs each job once per round, the order rotated every round (so that a
  change of machine load hits every job alike); ``{name: [result per round]}``.
  Each job runs its own timed repetitions and returns what it measured."""
  names = list(jobs)
  out = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      out[n].append(jobs[n]())
  return out


# -------------------------------------------------------- bench workloads ----

class Workload(NamedTuple):
  """A config the benchmarks time, with where it came from."""
  name: str  # "mfeat", "MOSI-shaped"
  config: Any
  source: str  # the config file and variant, with any overrides, for the reports
  overrides: dict  # dotted keys applied to the source config


def mosi_settings(config) -> dict:
  """ModalImmune's settings as a user of ``configs/mosi.py`` gets them (its
  periods, ``hyper_every`` 250, and ``hyper_batch_size`` 32), as dotted
  overrides of the ``method.modalimmune`` keys in which ``config`` differs."""
  mosi = get_config("mosi", validate=False).method.modalimmune
  mine = config.method.modalimmune
  return {f"method.modalimmune.{k}": v for k, v in mosi.items() if mine[k] != v}


def bench_workloads(quick: bool = False) -> list[Workload]:
  """The two workloads of the step-cost benchmarks: ``configs/mfeat.py`` and
  MOSI-shaped synthetic data (``configs/synthetic.py:mosi_shaped``: 3 sequence
  modalities of 50 frames, widths 300/74/35, regression, batch 32) with
  ModalImmune's settings from ``configs/mosi.py`` (:func:`mosi_settings`).
  ``quick``: each one's ``smoke`` sizes and periods (``common.smoke``; for
  MOSI-shaped also 128/32/64 samples), so every periodic part fires within a
  few steps."""
  from modalimmune_jax.config import validate_config
  mfeat = Workload("mfeat", get_config("mfeat", "smoke" if quick else ""),
                   "configs/mfeat.py" + (":smoke" if quick else ""), {})
  shaped = get_config("synthetic", "mosi_shaped", validate=False)
  overrides = mosi_settings(shaped)
  config = get_config("synthetic", "mosi_shaped", validate=False, overrides=overrides)
  source = ("configs/synthetic.py:mosi_shaped with ModalImmune's settings of configs/mosi.py ("
            + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) + ")")
  if quick:
    config = config_module("common").smoke(config)
    config.data.synthetic.num_samples = (128, 32, 64)
    source = "configs/synthetic.py:mosi_shaped with configs/common.py's smoke sizes"
    overrides = {}
  validate_config(config)
  return [mfeat, Workload("MOSI-shaped", config, source, overrides)]


def amortising_window(config, least: int) -> int:
  """The smallest multiple of ModalImmune's periods in ``config`` (``hyper_every``,
  ``ctrl_every``, ``mask_every``) that is at least ``least`` steps: any window
  of that many consecutive steps holds every periodic part exactly as often as
  training does per step (mfeat: 100 steps, 2 hyper-steps; MOSI's periods: 250)."""
  mi = config.method.modalimmune
  period = lcm(mi.hyper_every, mi.ctrl_every, mi.mask_every)
  return period * max(1, -(-least // period))


def workload_flags(p: argparse.ArgumentParser) -> None:
  """The step-cost benchmarks' shared flags: ``--workloads`` (names of
  :func:`bench_workloads`, both by default) and ``--steps W`` (default None:
  :func:`amortising_window`)."""
  names = [w.name for w in bench_workloads()]
  p.add_argument("--workloads", nargs="+", default=names, choices=names,
                 help="(both: %(default)s)")
  p.add_argument("--steps", type=int, default=None,
                 help="W timed steps per window (default: the smallest multiple of "
                 "ModalImmune's periods >= 100; --quick: >= 4)")


def window_inputs(run, first: int, count: int, rng, distinct: int = 100) -> list[tuple]:
  """``(batch, key, step)`` of the steps ``first .. first + count - 1`` for a
  timed window (:func:`device_inputs`), with at most ``distinct`` different
  batches and keys on the device, then repeated (a MOSI-shaped batch is 2.6
  MB); the step numbers go on, so the periodic programs fire as in training."""
  base = device_inputs(run, range(first, first + min(count, distinct)), rng)
  return [(*base[i % len(base)][:2], first + i) for i in range(count)]


def compile_periodic(run, state, batch, key, steps: Iterable[int] | None = None
                     ) -> dict[str, float]:
  """Calls each periodic program of ``run.step_fn`` (that fires at one of
  ``steps``, if given) once, on a copy of ``state`` (so ``state`` is
  unchanged), so that no timed window compiles one (BHGD's fires only every
  ``hyper_every`` steps); ``{program name: seconds of that first call}``."""
  import jax
  steps = None if steps is None else list(steps)
  seconds = {}
  for p, fn in run.step_fn.periodic:
    if steps is not None and not any(p.fires(s) for s in steps):
      continue
    t0 = time.perf_counter()
    jax.block_until_ready(fn(copy_tree(state), batch, key))
    seconds[p.fn.__name__] = time.perf_counter() - t0
  return seconds


def gflops(fn, *args) -> float:
  """XLA's count of the floating-point operations of the jitted ``fn``'s
  program compiled for ``args`` (``cost_analysis``; JAX reuses the executable
  of an earlier call with the same arguments, else it compiles), in GFLOP. A
  while loop's body is counted once (a solve runs it up to its cap)."""
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / 1e9


def step_gflops(run, state, batch, key) -> dict:
  """A run's arithmetic per step: its train step's GFLOP, each periodic
  program's per call and its period, and the amortised step (train step + each
  program / its period)."""
  train_step = gflops(run.step_fn.train_step, state, batch, key)
  programs = {p.fn.__name__: (p.every, gflops(fn, state, batch, key))
              for p, fn in run.step_fn.periodic}
  return {"train_step": train_step,
          "programs": {n: {"every": e, "gflop_per_call": g} for n, (e, g) in programs.items()},
          "amortised": train_step + sum(g / e for e, g in programs.values())}


def time_windows(jobs: dict[str, tuple[Callable, Any]], inputs: Sequence[tuple], rounds: int
                 ) -> tuple[dict[str, list[float]], dict[str, Timed]]:
  """Warm windows: ``jobs[name] = (step_fn, state)`` steps over all of
  ``inputs`` (:func:`timed_steps`) once per round, the jobs alternated
  (:func:`alternate`). Returns the seconds per step of each window,
  ``{name: [per round]}``, and each job's last :class:`Timed`. The state goes
  on from window to window (the step donates it; the step numbers in
  ``inputs`` repeat, so every round has the same periodic events)."""
  states = {name: state for name, (_, state) in jobs.items()}
  last = {}

  def job(name):
    def window():
      timed = timed_steps(jobs[name][0], states[name], inputs)
      states[name], last[name] = timed.state, timed
      log(f"  {name}: {timed.seconds / len(inputs) * 1e3:.2f} ms/step")
      return timed.seconds / len(inputs)
    return window

  return alternate({name: job(name) for name in jobs}, rounds), last
