"""Reliability promises: checkpoints that cannot get a run stuck, a work
directory that remembers its config, one-line errors before any compilation,
numerical faults handled inside the step, the device-resident pipeline, and
numbers that repeat."""

import json
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import train
from modalimmune_jax.methods import plain
from modalimmune_jax.step import gather_batch
from tests.helpers import ROOT, flat, get_config, restore_state

QUICK_EVAL = {"removals": "none", "missing_rates": (), "snrs_db": ()}


def _config(**train_overrides):
  config = get_config()
  for k, v in QUICK_EVAL.items():
    setattr(config.eval, k, v)
  for k, v in train_overrides.items():
    setattr(config.train, k, v)
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every fault-injection test must reproduce exactly."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  return train.train_and_evaluate(_config(), workdir), workdir


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")


# ---------------------------------------------------------------- checkpoints

def test_corrupted_final_checkpoint_is_moved_aside_and_retrained_every_time(reference, tmp_path):
  """The final step is saved again after the fallback (orbax used to refuse:
  StepAlreadyExistsError), and the same works on every later corruption."""
  full, _ = reference
  config = _config()
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  for attempt in range(2):
    _corrupt(os.path.join(workdir, "checkpoints", str(config.train.steps)))
    resumed = train.train_and_evaluate(config, workdir)
    assert resumed["start_step"] == config.checkpoint.every, attempt
    np.testing.assert_array_equal(flat(resumed["final_params"]), flat(full["final_params"]))
  aside = os.listdir(os.path.join(workdir, "checkpoints.aside"))
  assert len(aside) == 2 and all(a.startswith(f"{config.train.steps}.") for a in aside)


def test_partial_checkpoint_write_is_moved_aside(reference, tmp_path):
  full, _ = reference
  config = _config(stop_after=6)
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  partial = os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(partial, "state"))
  config.train.stop_after = 0
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed["start_step"] == 6
  assert not os.path.exists(partial)
  assert any(n.startswith("9.orbax-checkpoint-tmp-123")
             for n in os.listdir(os.path.join(workdir, "checkpoints.aside")))
  np.testing.assert_array_equal(flat(resumed["final_params"]), flat(full["final_params"]))


def _cli(*args, timeout=300, **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "modalimmune_jax.main", *args], cwd=ROOT,
                          env=env, text=True, **popen)


CLI_ARGS = ["--config=experiments/configs/synthetic.py:smoke",
            "--config.eval.removals=none", "--config.eval.missing_rates=()",
            "--config.eval.snrs_db=()", "--config.train.log_every=1"]


def _wait_for_training(workdir, min_step=2, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isfile(path):
      steps = [json.loads(ln).get("step", 0) for ln in open(path) if '"train"' in ln]
      if steps and max(steps) >= min_step:
        return max(steps)
    time.sleep(0.02)
  raise AssertionError("the run never started training")


@pytest.mark.slow
def test_sigterm_and_sigint_save_a_checkpoint_then_resume_exactly(tmp_path):
  import re
  long = ["--config.checkpoint.every=200", "--config.train.steps=400"]
  config = _config(steps=400, log_every=1)
  config.checkpoint.every = 200
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))
  for signum in (signal.SIGTERM, signal.SIGINT):
    workdir = str(tmp_path / signal.Signals(signum).name)
    args = CLI_ARGS + [f"--workdir={workdir}"] + long
    proc = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
      _wait_for_training(workdir)
      proc.send_signal(signum)
      _, err = proc.communicate(timeout=120)
    finally:
      proc.kill()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"stopped: {signal.Signals(signum).name} at step" in err
    at = int(re.search(r"at step (\d+)", err).group(1))
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert max(saved) == at < 400, (saved, at)  # not a scheduled checkpoint: the signal's
    done = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]
    assert f"resumed from step {at}" in out
    _, state = restore_state(config, workdir)
    np.testing.assert_array_equal(flat(state.params), flat(uninterrupted["final_params"]))


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_identically(reference, tmp_path):
  """Killed (SIGKILL) three times at random moments, with a checkpoint every
  step, so some kills land inside a checkpoint write."""
  full, _ = reference
  workdir = str(tmp_path)
  args = CLI_ARGS + [f"--workdir={workdir}", "--config.checkpoint.every=1"]
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(3):
    proc = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      _wait_for_training(workdir, min_step=0)
      time.sleep(rng.uniform(0.0, 0.6))
      if proc.poll() is None:
        proc.kill()
        kills += 1
    finally:
      proc.wait(timeout=60)
  assert kills >= 1
  done = _cli(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  assert done.wait(timeout=300) == 0, done.stderr.read()[-2000:]
  config = _config()
  step, state = restore_state(config, workdir)
  assert step == config.train.steps
  np.testing.assert_array_equal(flat(state.params), flat(full["final_params"]))
  for a, b in zip(jax.tree.leaves(state.method_state),
                  jax.tree.leaves(full["final_state"].method_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------- the work directory

def test_a_key_added_to_another_methods_section_keeps_finished_runs(tmp_path):
  """compare.finished reuses a finished plain run whose config lacks a key added to
  EBR's section since, and refuses an EBR run that lacks it (and one of
  another eval protocol), naming the key; the resume check skips it likewise."""
  from modalimmune_jax import compare
  from modalimmune_jax.config import trained_differences, with_overrides

  def finished_run(config, name):
    old = json.loads(config.to_json_best_effort())
    del old["method"]["ebr"]["cross_weight"]  # as written before the key existed
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "results.json").write_text(json.dumps({"config": old, "accuracy": 0.5}))
    return old, str(workdir)

  plain_config = get_config()
  old, workdir = finished_run(plain_config, "plain")
  assert compare.finished(plain_config, workdir)["accuracy"] == 0.5
  assert trained_differences(old, plain_config) == []
  with pytest.raises(train.WorkdirError, match=r"eval.draws 1 -> 3"):
    compare.finished(with_overrides(plain_config, {"eval.draws": 3}), workdir)
  ebr_config = with_overrides(plain_config, {"method.name": "ebr"})
  old, workdir = finished_run(ebr_config, "ebr")
  with pytest.raises(train.WorkdirError, match=r"method.ebr.cross_weight '<absent>' -> 1.0"):
    compare.finished(ebr_config, workdir)
  assert [k for k, _, _ in trained_differences(old, ebr_config)] == ["method.ebr.cross_weight"]


def test_work_directory_refuses_another_config_naming_the_keys(reference, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(), workdir)
  before = sorted(os.listdir(workdir))
  shorter = _config(steps=6)
  with pytest.raises(train.WorkdirError, match=r"train.steps 12 -> 6.*--fresh.*--extend"):
    train.train_and_evaluate(shorter, workdir)
  wider = _config()
  wider.model.hidden = 32
  with pytest.raises(train.WorkdirError, match=r"model.hidden 16 -> 32"):
    train.train_and_evaluate(wider, workdir)
  with pytest.raises(train.WorkdirError, match=r"--extend .* changes model.hidden"):
    train.train_and_evaluate(wider, workdir, on_change="extend")
  assert sorted(os.listdir(workdir)) == before  # nothing touched
  # evaluation-only keys may change: the trained parameters are evaluated again
  relabel = _config()
  relabel.eval.missing_rates = (0.5,)
  again = train.train_and_evaluate(relabel, workdir)
  assert again["start_step"] == 12 and again["train_seconds"] < 60
  assert any(r["condition"] == "missing rate 0.5" for r in again["protocol"]["rows"])
  # extend: on to more steps; fresh: the old run moved aside, never deleted
  longer = train.train_and_evaluate(_config(steps=18), workdir, on_change="extend")
  assert longer["start_step"] == 12 and longer["steps"] == 18
  fresh = train.train_and_evaluate(shorter, workdir, on_change="fresh")
  assert fresh["start_step"] == 0
  assert [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]


# ------------------------------------------------------ numerical faults ----

class _Stat(NamedTuple):
  stat: jax.Array


def _bad_stat_method(bad_from: int):
  """Plain training plus a method statistic that turns NaN from step ``bad_from``."""
  def build(model):
    base = plain.plain(model)

    def update(state, params, batch, rng, step, axis_name=None):
      return _Stat(jnp.where(step >= bad_from, jnp.nan, state.stat + 1.0)), {}
    return base._replace(name="bad-stat", init=lambda p: _Stat(jnp.zeros([])), update=update)
  return build


def test_nonfinite_method_statistic_stops_naming_step_and_term(tmp_path, monkeypatch):
  config = _config(max_nonfinite=3, log_every=4)
  config.checkpoint.enabled = False
  reads = []
  from modalimmune_jax.train import loop, run
  real = loop.host_copy
  for module in (loop, run):  # the loop's reads and the run's
    monkeypatch.setattr(module, "host_copy", lambda t: reads.append(1) or real(t))
  with pytest.raises(train.NonFiniteError,
                     match=r"non-finite method_state.stat at step 7: 3 bad step\(s\) in a row "
                           r"\(train.max_nonfinite=3\)"):
    train.train_and_evaluate(config, str(tmp_path), method=_bad_stat_method(5))
  # host reads at start and at the logging intervals only (counters at steps 4 and 8,
  # metrics at step 4), not at each of the 8 steps run
  assert len(reads) <= 4, len(reads)


def test_skipped_steps_are_counted_without_stopping(tmp_path):
  config = _config(max_nonfinite=1000)
  config.checkpoint.enabled = False
  summary = train.train_and_evaluate(config, str(tmp_path), method=_bad_stat_method(9))
  assert summary["nonfinite_skipped"] == 3  # steps 9, 10, 11
  assert int(summary["final_state"].method_state.stat) == 9  # the last good value
  health = summary["final_state"].health
  assert int(health.last_bad) == 11 and int(health.run) == 3 and not int(health.halted)


# ----------------------------------------------- pipeline and determinism ----

def test_device_pipeline_yields_exactly_the_host_batches():
  config = _config()
  run = train.setup(config, num_devices=1)
  split = run.dataset.splits["train"]
  from modalimmune_jax.step import device_data
  data = device_data(split, run.mesh)
  idx = run.batches.indices(5, 6)  # crosses the epoch boundary at step 8
  for i in range(6):
    host = run.batches(5 + i)
    dev = gather_batch(data, jnp.asarray(idx[i]))
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(dev)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_same_config_twice_is_bit_identical_and_pipelines_agree(reference, tmp_path):
  full, _ = reference
  config = _config()
  config.checkpoint.enabled = False
  config.train.device_data = "device"
  again = train.train_and_evaluate(config, str(tmp_path / "again"))
  np.testing.assert_array_equal(flat(again["final_params"]), flat(full["final_params"]))
  assert again["protocol"] == full["protocol"]
  host = _config(device_data="host")
  host.checkpoint.enabled = False
  via_host = train.train_and_evaluate(host, str(tmp_path / "host"))
  np.testing.assert_array_equal(flat(via_host["final_params"]), flat(full["final_params"]))


def test_several_steps_per_dispatch_match_one(reference, tmp_path):
  full, _ = reference
  config = _config(steps_per_dispatch=3, log_every=3, device_data="device")  # lax.scan
  config.checkpoint.every = 6
  config.train.stop_after = 6
  train.train_and_evaluate(config, str(tmp_path))  # and resume after a stop, with k = 3
  config.train.stop_after = 0
  scanned = train.train_and_evaluate(config, str(tmp_path))
  assert scanned["start_step"] == 6
  np.testing.assert_allclose(flat(scanned["final_params"]), flat(full["final_params"]),
                             rtol=0, atol=1e-6)


# ------------------------------------------------------ command-line errors ----

def _bad_inputs(tmp):
  notpickle = tmp / "not_a_pickle.pkl"
  notpickle.write_bytes(b"hello")
  import pickle
  wrongkeys = tmp / "wrong_keys.pkl"
  wrongkeys.write_bytes(pickle.dumps({"train": {"text": np.zeros((2, 3))}}))
  syn = "--config=experiments/configs/synthetic.py:smoke"
  mosi = "--config=experiments/configs/mosi.py:smoke"
  return [
      ("main", [syn, "--config.train.stepz=5"], "did you mean 'train.steps'"),
      ("main", [syn, "--config.train.steps=abc"], "train.steps"),
      ("main", [syn, "--config.eval.missing_rates=(1.5,)"], "eval.missing_rates"),
      ("main", [syn, "--config.eval.snrs_db=('abc',)"], "eval.snrs_db"),
      ("main", ["--config=experiments/configs/nope.py"], "nope.py"),
      ("main", [mosi, "--config.data.path=/no/such/file.pkl"], "/no/such/file.pkl"),
      ("main", [mosi, f"--config.data.path={notpickle}"], "not_a_pickle.pkl"),
      ("main", [mosi, f"--config.data.path={wrongkeys}"], "wrong_keys.pkl"),
      ("main", [syn, "--fresh", "--extend"], "--fresh"),
      ("compare", [syn, "--methods=plain,foo"], "--methods"),
      ("data", ["describe", "mosi", "--path=/no/such/file.pkl"], "/no/such/file.pkl"),
  ]


@pytest.mark.slow
def test_user_errors_are_one_line_exit_2_and_create_nothing(tmp_path):
  for i, (command, args, expect) in enumerate(_bad_inputs(tmp_path)):
    workdir = tmp_path / f"run{i}"
    module = {"main": "modalimmune_jax.main", "compare": "modalimmune_jax.compare",
              "data": "modalimmune_jax.data"}[command]
    extra = [] if command == "data" else [f"--workdir={workdir}"]
    proc = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (args, proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 3, (args, proc.stderr)
    assert lines[-1].startswith("error: ") and expect in lines[-1], (args, lines)
    assert not workdir.exists(), args
