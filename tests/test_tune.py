"""python -m modalimmune_jax.tune: several workers on one Optuna study, a worker
killed mid-trial and rerun, bad input refused before anything is made, and the
search spaces and samplers giving valid configs."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from tests.helpers import ROOT, get_config

# The smoke config (hidden 16) cut to 8 steps with a checkpoint every 4 (so a
# killed trial has one to resume from), only the full condition evaluated.
ARGS = ["--config=experiments/configs/synthetic.py:smoke", "--space=plain", "--sampler=random",
        "--config.eval.removals=none", "--config.eval.missing_rates=()",
        "--config.eval.snrs_db=()", "--config.train.tensorboard=False",
        "--config.train.steps=8", "--config.checkpoint.every=4", "--config.train.log_every=4"]
STUDY = "synthetic-plain"  # the default name: <data.name>-<space>


def _tune(*args, **popen):
  return subprocess.Popen([sys.executable, "-m", "modalimmune_jax.tune", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True, **popen)


def _trials(workdir):
  storage = optuna.storages.RDBStorage(f"sqlite:///{workdir}/study.db")
  study = optuna.load_study(study_name=STUDY, storage=storage)
  return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def _complete(trials):
  return [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]


def _run_dirs(workdir):
  return sorted(os.listdir(os.path.join(workdir, "trials")), key=int)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  """Two workers started together on one SQLite study, 3 trials in all (an odd
  number: when the two finish their first trials together, both may start
  one more, and one of them must not run it)."""
  workdir = str(tmp_path_factory.mktemp("tune"))
  procs = [_tune(*ARGS, f"--workdir={workdir}", "--trials=3",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
  errs = [p.communicate(timeout=300)[1] for p in procs]
  return workdir, [p.returncode for p in procs], errs


@pytest.mark.slow
def test_two_workers_share_one_study_and_run_exactly_the_trials(study_dir):
  workdir, codes, errs = study_dir
  assert codes == [0, 0], [e[-2000:] for e in errs]
  trials = _trials(workdir)
  complete = _complete(trials)
  assert len(complete) == 3
  # every complete trial trained once, in its own directory; a surplus trial made none
  dirs = [t.user_attrs["run_dir"] for t in complete]
  assert sorted(os.path.basename(d) for d in dirs) == _run_dirs(workdir)
  assert len(set(dirs)) == 3
  for d in dirs:
    with open(os.path.join(d, "results.json")) as f:
      record = json.load(f)
    assert record["start_step"] == 0 and record["config"]["eval"]["split"] == "valid"
  assert all(t.user_attrs.get("surplus") for t in trials if t not in complete)
  # one progress line per finished trial, over both workers
  lines = [ln for e in errs for ln in e.splitlines() if ln.startswith("trial ")]
  assert sum(" COMPLETE: valid accuracy " in ln for ln in lines) == 3, lines
  # the report (rewritten by --collect alone, which trains nothing)
  for name in ("tuning.md", "tuning.json"):
    os.remove(os.path.join(workdir, name))
  done = _tune(*ARGS, f"--workdir={workdir}", "--collect", stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE)
  assert done.wait(timeout=120) == 0, done.stderr.read()[-2000:]
  with open(os.path.join(workdir, "tuning.json")) as f:
    report = json.load(f)
  assert [r["number"] for r in report["trials"]] == [t.number for t in trials]
  best = max(complete, key=lambda t: t.value)
  assert report["best"]["number"] == best.number and report["best"]["value"] == best.value
  assert report["best_flags"] == [f"--config.{k}={v if isinstance(v, str) else repr(v)}"
                                  for k, v in best.user_attrs["overrides"].items()]
  assert best.user_attrs["overrides"] == {"method.name": "plain", **best.params}
  assert report["provenance"]["commit"] and "command" in report["provenance"]
  md = open(os.path.join(workdir, "tuning.md")).read()
  assert f"Best: trial {best.number}" in md and "--config.optim.learning_rate=" in md
  assert os.path.getsize(os.path.join(workdir, "tuning.png")) > 1000
  assert len(_trials(workdir)) == len(trials) and len(_run_dirs(workdir)) == 3


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_and_its_run_resumed(study_dir):
  """The same study taken on to 4 trials: the worker is SIGKILLed once its new
  trial has a checkpoint; rerun, it waits for the trial to go stale (no
  heartbeat for 3 s), retries its parameters in the killed trial's run
  directory, which resumes."""
  workdir, codes, _ = study_dir
  assert codes == [0, 0]
  args = [*ARGS, f"--workdir={workdir}", "--trials=4", "--heartbeat=1"]
  before = set(_run_dirs(workdir))
  proc = _tune(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed = None
  try:
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and proc.poll() is None:
      for name in set(_run_dirs(workdir)) - before:
        run = os.path.join(workdir, "trials", name)
        ckpt = os.path.join(run, "checkpoints")
        if (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))
            and not os.path.exists(os.path.join(run, "results.json"))):
          proc.send_signal(signal.SIGKILL)
          killed = run
          break
      time.sleep(0.02)
  finally:
    proc.kill()
    proc.wait(timeout=60)
  assert killed is not None, "no trial was caught mid-run"
  running = [t for t in _trials(workdir) if t.state == optuna.trial.TrialState.RUNNING]
  assert [t.user_attrs["run_dir"] for t in running] == [killed]
  lost = running[0].number
  done = _tune(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, err = done.communicate(timeout=300)
  assert done.returncode == 0, err[-2000:]
  trials = _trials(workdir)
  complete = _complete(trials)
  assert len(complete) == 4
  assert trials[lost].state == optuna.trial.TrialState.FAIL
  retry = [t for t in complete if t.system_attrs.get("retry_history") == [lost]]
  assert len(retry) == 1 and retry[0].user_attrs["run_dir"] == killed
  assert retry[0].params == trials[lost].params
  with open(os.path.join(killed, "results.json")) as f:
    assert json.load(f)["start_step"] > 0  # resumed from the killed run's checkpoint
  assert len(_run_dirs(workdir)) == 4  # nothing lost, no directory for the retry
  with open(os.path.join(workdir, "tuning.json")) as f:
    report = {r["number"]: r for r in json.load(f)["trials"]}
  assert report[lost]["retried_as"] == retry[0].number


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_before_anything(tmp_path):
  cases = [(["--space=nosuch"], "--space"), (["--sampler=cmaes"], "--sampler"),
           (["--trials=0"], "--trials"), (["--storage=nosuchdb://host/db"], "--storage"),
           (["--config.train.stepz=3"], "train.stepz")]
  procs = []
  for i, (extra, _) in enumerate(cases):
    procs.append(_tune(*ARGS, f"--workdir={tmp_path / f'run{i}'}", *extra,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    if i % 2:  # two at a time (two cores)
      for p in procs[-2:]:
        p.wait(timeout=120)
  for i, ((extra, expect), proc) in enumerate(zip(cases, procs)):
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2, (extra, err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (extra,
                                                                                        lines)
    assert not (tmp_path / f"run{i}").exists(), extra
  # the same checks, in this process: each raises cli.FlagError naming the flag
  from modalimmune_jax import cli, tune
  for call, expect in [(lambda: tune.space("method:nosuch"), "--space=method:nosuch"),
                       (lambda: tune.open_storage(f"sqlite:///{tmp_path}/missing/s.db", 1),
                        "--storage")]:
    with pytest.raises(cli.FlagError, match=expect):
      call()
  assert not (tmp_path / "missing").exists()


def test_spaces_and_samplers_give_valid_configs():
  from modalimmune_jax import methods, tune
  from optuna.trial import FixedTrial
  base = get_config("synthetic", "smoke")
  for name in ("modalimmune", "plain", "optim"):
    s = tune.space(name)
    tune.check_space(base, s)
    grid = tune.grid(s)
    for kind in ("grid", "random", "tpe"):
      study = optuna.create_study(sampler=tune.make_sampler(kind, s, seed=0),
                                  direction="maximize")
      points = []
      for _ in range(3):
        trial = study.ask()
        overrides = tune.trial_overrides(s, trial)
        cfg = tune.trial_config(base, overrides)  # validated
        assert cfg.eval.split == "valid" and tuple(cfg.train.seeds) == ()
        assert {k: v for k, v in overrides.items() if k in s.params} == trial.params
        for key, dist in s.params.items():
          value = overrides[key]
          assert dist.low <= value <= dist.high, (name, kind, key, value)
          if kind == "grid":
            assert value in grid[key]
        for key, value in s.fixed.items():
          assert overrides[key] == value
        points.append(tuple(sorted(trial.params.items())))
        study.tell(trial, 0.5)
      assert len(set(points)) == 3, (name, kind, points)
  # random: one --seed draws the same points again (each trial from (seed, number))
  s = tune.space("plain")
  draws = []
  for _ in range(2):
    study = optuna.create_study(sampler=tune.make_sampler("random", s, seed=3))
    draws.append([tune.trial_overrides(s, study.ask()) for _ in range(2)])
  assert draws[0] == draws[1] and draws[0][0] != draws[0][1]
  # method:<name> is a choice over the method's own search rows
  s = tune.space("method:modalimmune")
  rows = methods.get("modalimmune").search
  for i, row in enumerate(rows):
    overrides = tune.trial_overrides(s, FixedTrial({tune.ROW: i}))
    assert overrides == {"method.name": "modalimmune", **row}
    assert tune.trial_config(base, overrides).method.name == "modalimmune"
  study = optuna.create_study(sampler=tune.make_sampler("grid", s, seed=0))
  seen = [tune.trial_overrides(s, study.ask()) for _ in rows]
  assert sorted(map(json.dumps, seen)) == sorted(
      json.dumps({"method.name": "modalimmune", **r}) for r in rows)
  assert tune.override_flags({"optim.learning_rate": 0.002, "eval.snrs_db": (10.0,)}) == [
      "--config.optim.learning_rate=0.002", "'--config.eval.snrs_db=(10.0,)'"]
