"""``compare`` over several machines (issue 18, part 4): ``--shard=i/N`` workers on
one shared work directory, then ``--collect``, render what one machine renders.

The plan and the waiting are tested in-process without training; one test trains
the tiny comparison (synthetic smoke, plain and dropout, 2 seeds, 4 steps) once
unsharded and once by two concurrent worker subprocesses, and checks the bad
flags and a collect with a missing run beside them."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from modalimmune_jax import compare
from modalimmune_jax.config import with_overrides
from tests.helpers import ROOT, get_config

TINY = ["--config=experiments/configs/synthetic.py:smoke", "--methods=plain,dropout",
        "--seeds=0,1", "--noreference", "--config.train.steps=4",
        "--config.checkpoint.every=4", "--config.train.log_every=2",
        "--config.eval.removals=drop_one"]


def _rows(names=("plain", "dropout")):
  """The rows ``compare`` builds for ``--methods`` on the synthetic smoke config."""
  base = get_config("synthetic", "smoke")
  return {m: with_overrides(base, {"method.name": m, "train.seeds": ()}) for m in names}


def test_parse_shard():
  assert compare.parse_shard("0/1") == (0, 1) and compare.parse_shard("3/4") == (3, 4)
  from modalimmune_jax.cli import FlagError
  for bad in ("3/2", "2/2", "x", "0/0", "-1/2", "1/2/3", "", "1/"):
    with pytest.raises(FlagError, match=r"^--shard: .*" + re.escape(repr(bad))):
      compare.parse_shard(bad)


def test_units_are_every_trial_then_every_seed_dealt_round_robin():
  units = compare.work_units({"plain": 3, "dropout": 2}, [0, 1])
  assert units == [("tune", "plain", 0), ("tune", "plain", 1), ("tune", "plain", 2),
                   ("tune", "dropout", 0), ("tune", "dropout", 1),
                   ("seed", "plain", (0,)), ("seed", "plain", (1,)),
                   ("seed", "dropout", (0,)), ("seed", "dropout", (1,))]
  shards = [compare.shard_units(units, i, 4) for i in range(4)]
  assert sorted(sum(shards, []), key=units.index) == units  # each unit exactly once
  assert shards[1] == [units[1], units[5]]
  assert compare.shard_units(units, 0, 20) == units[:1] and compare.shard_units(units, 12, 20) == []
  # --together: a row's seeds are one unit (one vmapped program, as unsharded)
  assert compare.work_units({"a": 0, "b": 0}, [0, 1], together=True) == [
      ("seed", "a", (0, 1)), ("seed", "b", (0, 1))]


def _record(score: float) -> dict:
  return {"protocol": {"rows": [{"condition": "full", "accuracy": score}],
                       "meta": {"conditions": [{"name": "full", "kind": "full"}]}},
          "steps": 4, "start_step": 0, "first_step_seconds": 1.0, "train_seconds": 2.0}


def test_a_worker_waits_for_the_other_shards_trials_then_trains_the_chosen_one(
    monkeypatch, tmp_path, capsys):
  """Shard 7 of 10 holds only plain's seed 1: it polls plain's three trials
  (finishing one after another, by other shards) and then trains the best."""
  polls: dict[str, int] = {}
  scores = [0.5, 0.7, 0.6]

  def done(config, workdir):
    polls[workdir] = polls.get(workdir, 0) + 1
    trial = int(os.path.basename(workdir))
    return _record(scores[trial]) if polls[workdir] > trial + 1 else None

  trained = []
  monkeypatch.setattr(compare, "_done", done)
  monkeypatch.setattr(compare, "run_seeds", lambda cfg, seeds, dirs, together: trained.append(
      (cfg, seeds, dirs)))
  work = str(tmp_path)
  got = compare.run_shard(_rows(), [0, 1], work, "accuracy", index=7, count=10,
                          wait_seconds=5.0, poll_seconds=0.01)
  assert got == [compare.seed_dir(work, "plain", 1)]
  [(cfg, seeds, dirs)] = trained
  assert seeds == [1] and dirs == got
  best = compare.search_space("plain")[1]
  assert all(cfg[k.split(".")[0]][k.split(".")[1]] == v for k, v in best.items())
  waits = [ln for ln in capsys.readouterr().err.splitlines() if "waiting" in ln]
  assert len(waits) == 3 and "shard 7/10: waiting for the tuning trials of 'plain'" in waits[0]
  assert f"{compare.trial_dir(work, 'plain', 0)} (shard 0/10)" in waits[0]


def test_a_worker_stops_when_no_awaited_trial_finishes(tmp_path):
  work = str(tmp_path)
  with pytest.raises(compare.ShardTimeout) as e:
    compare.run_shard(_rows(), [0, 1], work, "accuracy", index=6, count=10,
                      wait_seconds=0.2, poll_seconds=0.02)
  message = str(e.value)
  assert message.startswith("--shard=6/10: waited 0.2 s (--shard_wait)")
  assert ", ".join(f"{compare.trial_dir(work, 'plain', i)} (shard {i}/10)"
                   for i in range(3)) in message
  assert "rerun those shards" in message and "\n" not in message
  assert not os.listdir(work)  # nothing trained, nothing created


def _start(workdir, out, *extra):
  """A compare subprocess, its output in ``out``.log (pipes could fill up)."""
  log = open(f"{out}.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "modalimmune_jax.compare", *TINY,
                           f"--workdir={workdir}", *extra], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  proc.log = log
  return proc


def _finish(proc, timeout=300) -> tuple[int, str]:
  rc = proc.wait(timeout=timeout)
  proc.log.close()
  with open(proc.log.name) as f:
    return rc, f.read()


def _without_timing(table: dict) -> dict:
  """comparison.json without what differs between two runs of the same results:
  provenance, timing, work directories."""
  out = {k: v for k, v in table.items()
         if k not in ("provenance", "wall_seconds", "step_costs", "runs")}
  out["chosen"] = {label: {"overrides": c["overrides"],
                           "trials": [{k: v for k, v in t.items() if k != "seconds_per_step"}
                                      for t in c["trials"]]}
                   for label, c in table["chosen"].items()}
  out["runs"] = {label: [{k: v for k, v in r.items()
                          if k not in ("provenance", "train_seconds", "workdir")} for r in runs]
                 for label, runs in table["runs"].items()}
  return out


def test_every_worker_must_deal_the_plan_the_first_one_wrote(tmp_path):
  """The first worker writes the plan; a worker (or --collect) with other seeds, rows,
  tuning or config keys is refused naming the difference; logging keys may differ."""
  from modalimmune_jax.cli import FlagError
  rows, work = _rows(), str(tmp_path)
  compare.check_plan(work, rows, [0, 1], True, False)
  assert json.loads((tmp_path / compare.PLAN_FILE).read_text())["seeds"] == [0, 1]
  compare.check_plan(work, rows, [0, 1], True, False)  # the same plan: fine
  logged = {k: with_overrides(c, {"train.log_every": 1}) for k, c in rows.items()}
  compare.check_plan(work, logged, [0, 1], True, False)
  with pytest.raises(FlagError, match=r"^--seeds \[0, 2\] differs .*: \[0, 1\]"):
    compare.check_plan(work, rows, [0, 2], True, False)
  with pytest.raises(FlagError, match=r"^--together"):
    compare.check_plan(work, rows, [0, 1], True, True)
  with pytest.raises(FlagError, match=r"rows \['plain'\]"):
    compare.check_plan(work, _rows(("plain",)), [0, 1], True, False)
  other = dict(rows, dropout=with_overrides(rows["dropout"], {"method.dropout.rate": 0.9}))
  with pytest.raises(FlagError, match=r"^config key 'method.dropout.rate' of 'dropout' is 0.9"):
    compare.check_plan(work, other, [0, 1], True, False)
  assert sorted(os.listdir(work)) == [compare.PLAN_FILE]  # no temporary file left


@pytest.mark.slow
def test_two_shards_then_collect_render_what_one_machine_renders(tmp_path):
  # the workers first (their trials are different programs: each compiles its own),
  # then the unsharded run, beside the collects, from the compilation cache they filled
  one, shared = tmp_path / "one", tmp_path / "shared"
  procs = {i: _start(shared, tmp_path / f"shard{i}", f"--shard={i}/2") for i in (0, 1)}
  bad = {value: _start(tmp_path / f"bad{i}", tmp_path / f"bad{i}", f"--shard={value}")
         for i, value in enumerate(("3/2", "x", "0/0"))}
  for i, (value, proc) in enumerate(bad.items()):
    rc, out = _finish(proc)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, out
    assert lines[0].startswith("error: --shard: ") and repr(value) in lines[0], lines
    assert not (tmp_path / f"bad{i}").exists()  # refused before anything was made
  for name, proc in procs.items():
    rc, out = _finish(proc)
    assert rc == 0, (name, out[-3000:])
  assert not (shared / "comparison.json").exists()  # the workers render nothing
  # each run was trained by its shard: unit k by shard k mod 2
  units = compare.work_units({"plain": 3, "dropout": 3}, [0, 1])
  for k, (kind, label, key) in enumerate(units):
    path = (compare.trial_dir(str(shared), label, key) if kind == "tune"
            else compare.seed_dir(str(shared), label, key[0]))
    with open(os.path.join(path, "results.json")) as f:
      assert json.load(f)["provenance"]["command"].endswith(f"--shard={k % 2}/2"), path

  # the collect, and beside it one on a copy that lacks a trial: it trains nothing,
  # names the missing run and exits 2
  partial = tmp_path / "partial"
  shutil.copytree(shared, partial, ignore=shutil.ignore_patterns("checkpoints"))
  trial = compare.trial_dir(str(partial), "dropout", 2)
  os.rename(os.path.join(trial, "results.json"), os.path.join(trial, "results.aside"))
  unsharded = _start(one, tmp_path / "one")
  collect = _start(shared, tmp_path / "collect", "--collect")
  rc, out = _finish(_start(partial, tmp_path / "missing", "--collect"))
  lines = [ln for ln in out.splitlines() if ln.strip()]
  assert rc == 2 and len(lines) == 1, out
  assert lines[0] == (f"error: --collect: 1 run(s) not finished: {trial} (run every "
                      "--shard=i/N worker first; they resume)")
  assert not os.path.exists(os.path.join(trial, "results.json"))
  assert not (partial / "comparison.json").exists()

  rc, out = _finish(collect)
  assert rc == 0, out[-3000:]
  assert "Training cost per step" in out  # the markdown, printed
  rc, out = _finish(unsharded)
  assert rc == 0, out[-3000:]
  with open(one / "comparison.json") as f:
    single = json.load(f)
  with open(shared / "comparison.json") as f:
    sharded = json.load(f)
  assert {k: c["overrides"] for k, c in sharded["chosen"].items()} == {
      k: c["overrides"] for k, c in single["chosen"].items()}
  assert sharded["aggregate"] == single["aggregate"]  # every value, exactly
  assert _without_timing(sharded) == _without_timing(single)
  assert "--collect" in sharded["provenance"]["command"]
  for name in ("comparison.md", "comparison.png"):
    assert (shared / name).is_file()
