"""Every script under ``experiments/`` runs, so a broken script fails here.

* ``--help`` of every script, in-process (its module and every library name it
  imports at the top load; a syntax error or a removed name fails);
* a static check of each script's source: no import from ``tests/`` or from
  another script (only ``harness``), no ``sys.argv`` / ``sys.path``, no
  assignment to a library module's attributes (no patching), and every
  ``module.name`` it uses on a library module exists (``compare.SEARCH``, gone,
  would fail);
* a real run, into ``tmp_path``, of the scripts whose smallest mode takes
  seconds: ``training_dynamics`` on a written ``metrics.jsonl``,
  ``collapse_vs_robustness`` and ``ebr_without_fill`` on a 2-step EBR run,
  ``loop_vs_step --quick`` (the harness's timing loop), ``zero_shot --quick``,
  ``real_benchmark --quick`` on a generated IEMOCAP file (and the script's reading
  step on generated MOSI / MOSEI / IEMOCAP files in MulT's and MMSA's layouts);
  each result file
  carries its provenance. The other scripts' ``--quick`` runs take minutes
  (compilation) and are run by hand (``experiments/README.md`` lists them).

    python -m pytest -q -n 0 tests/test_experiments.py
"""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import subprocess

import jax
import pytest

from tests.helpers import ROOT, load_script

EXPERIMENTS = os.path.join(ROOT, "experiments")
SCRIPTS = ("behaviour_digest", "bench_baselines", "bench_core", "bench_implicit", "bench_methods",
           "bench_precision", "bench_train", "collapse_sweep", "collapse_vs_robustness",
           "ebr_variants", "ebr_widths", "ebr_without_fill", "fault_injection",
           "hypergrad_accuracy", "lean_settings", "loop_vs_step", "methods_table", "overhead",
           "profile_step", "real_benchmark", "soak", "training_dynamics", "tuning_mfeat",
           "tuning_toy", "zero_shot")


def source(name: str) -> ast.Module:
  path = os.path.join(EXPERIMENTS, f"{name}.py")
  with open(path) as f:
    return ast.parse(f.read(), path)


def assert_results(out, name: str, markdown: bool = True) -> dict:
  """``OUT/<name>.json`` (and ``.md``) exist and carry the provenance."""
  with open(os.path.join(out, f"{name}.json")) as f:
    record = json.load(f)
  prov = record["provenance"]
  assert prov["command"] and "commit" in prov and prov["machine"]["cpu_count"], prov
  if markdown:
    with open(os.path.join(out, f"{name}.md")) as f:
      text = f.read()
    assert "- command: `" in text and "- commit: " in text and "- machine: " in text
  return record


def test_every_script_is_smoke_tested():
  found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(EXPERIMENTS, "*.py"))}
  assert found - {"harness"} == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
  module = load_script(name)
  with pytest.raises(SystemExit) as stop:
    module.main(["--help"])
  assert stop.value.code == 0
  assert capsys.readouterr().out.startswith("usage:")


def library_modules(tree: ast.Module) -> dict[str, object]:
  """``{local name: module}`` of the library modules a script imports."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("modalimmune_jax") and a.asname:
          out[a.asname] = importlib.import_module(a.name)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modalimmune_jax"):
      for a in node.names:
        try:
          out[a.asname or a.name] = importlib.import_module(f"{node.module}.{a.name}")
        except ModuleNotFoundError:
          pass  # a name, not a module (checked by the import itself)
  return out


@pytest.mark.parametrize("name", SCRIPTS + ("harness",))
def test_script_rules(name):
  tree = source(name)
  harness = load_script("harness")
  modules = library_modules(tree)
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
      for imported in names:
        assert imported.split(".")[0] not in ("tests", *SCRIPTS), (
            f"{name}.py imports {imported}: only harness and the library")
      if isinstance(node, ast.ImportFrom) and node.module == "harness":
        missing = [a.name for a in node.names if not hasattr(harness, a.name)]
        assert not missing, f"{name}.py: harness has no {missing}"
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      owner = node.value.id
      assert (owner, node.attr) not in (("sys", "argv"), ("sys", "path")), (
          f"{name}.py:{node.lineno} uses sys.{node.attr}: use harness.parser / harness")
      if owner in modules:
        assert not isinstance(node.ctx, ast.Store), (
            f"{name}.py:{node.lineno} assigns {owner}.{node.attr}: no patching of the library")
        assert hasattr(modules[owner], node.attr), (
            f"{name}.py:{node.lineno}: {modules[owner].__name__}.{node.attr} does not exist")


def test_baselines_sh():
  path = os.path.join(EXPERIMENTS, "baselines.sh")
  subprocess.run(["bash", "-n", path], check=True)
  out = subprocess.run(["bash", path, "--help"], check=True, capture_output=True, text=True)
  assert "--out" in out.stdout


# ------------------------------------------------------------- real runs ----

def write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")


def test_training_dynamics(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "out"
  meta = lambda x: {f"meta/{k}": x for k in ("lambda", "kappa", "eta", "mu")}
  logs = [{"split": "train", "step": s, "alpha/text": 0.5 + 0.01 * s, "alpha/audio": 0.5,
           "ig/text": 0.1, "ig/audio": 0.2, "collapse/text": 0.1, **meta(1.0 + s)}
          for s in (4, 8, 12)]
  events = [{"event": "hypergrad", "step": 8, "applied": True, "certified": True,
             "before": {"mu": 1.0}, "after": {"mu": 1.5}},
            {"event": "resume", "step": 8}]
  write_jsonl(str(runs / "modalimmune" / "seed0" / "metrics.jsonl"), logs[:2] + events + logs[1:])
  (runs / "modalimmune" / "seed0" / "results.json").write_text('{"method": "modalimmune"}')
  write_jsonl(str(runs / "plain" / "seed0" / "metrics.jsonl"), logs)
  (runs / "plain" / "seed0" / "results.json").write_text('{"method": "plain"}')

  script = load_script("training_dynamics")
  assert script.main([str(runs), "--out", str(out)]) == 0
  record = assert_results(out, "training_dynamics")
  (run,) = record["runs"]
  assert run["summary"]["hyper_applied"] == 1 and run["resumes"] == 1
  assert len(record["skipped"]) == 1
  assert os.path.isfile(run["png"])


@pytest.fixture(scope="module")
def ebr_runs(tmp_path_factory):
  """A ``compare`` method directory with one 2-step EBR run (synthetic smoke)."""
  from modalimmune_jax import train
  harness = load_script("harness")
  config = harness.get_config("synthetic", "smoke", overrides={
      "method.name": "ebr", "train.steps": 2, "train.log_every": 1, "checkpoint.every": 2,
      "eval.removals": "drop_one", "eval.missing_rates": (), "eval.snrs_db": ()})
  root = tmp_path_factory.mktemp("ebr")
  train.train_and_evaluate(config, str(root / "seed0"))
  return root


@pytest.mark.slow
def test_collapse_vs_robustness(ebr_runs, tmp_path):
  script = load_script("collapse_vs_robustness")
  assert script.main([str(ebr_runs), "--out", str(tmp_path)]) == 0
  record = assert_results(tmp_path, "collapse_vs_robustness")
  assert not record["skipped"] and len(record["points"]) == 3  # one per modality
  assert all(p["reproduced"] for p in record["points"])
  assert os.path.isfile(tmp_path / "collapse_vs_robustness.png")


@pytest.mark.slow
def test_ebr_without_fill(ebr_runs, tmp_path):
  script = load_script("ebr_without_fill")
  out = tmp_path / "out"
  assert script.main([str(ebr_runs), "--seeds", "0", "--workdir", str(tmp_path / "work"),
                      "--out", str(out)]) == 0
  record = assert_results(out, "ebr_without_fill")
  full = record["accuracy"]["full"]
  assert full["with_fill"] == full["without_fill"]  # nothing missing: the fill is unused


@pytest.mark.slow
def test_loop_vs_step_quick(tmp_path):
  """The harness's timing loop, ``--quick`` and ``bench_config`` in one short run."""
  script = load_script("loop_vs_step")
  assert script.main(["--quick", "--out", str(tmp_path)]) == 0
  record = assert_results(tmp_path, "loop_vs_step", markdown=False)
  assert record["steps"] == 8 and record["loop_per_s"] > 0 and record["step_per_s"] > 0


def test_bench_implicit_quick(tmp_path):
  """Every problem's hyper-gradient within its certified bound of the exact answer
  (jaxopt's column only where jaxopt is installed: it is not a dependency)."""
  script = load_script("bench_implicit")
  assert script.main(["--quick", "--out", str(tmp_path)]) == 0
  record = assert_results(tmp_path, "bench_implicit")
  assert set(record["rows"]) == {"ridge", "logistic", "multi-penalty ridge"}
  for row in record["rows"].values():
    assert row["ours"]["certified"] and row["ours"]["bound_holds"], row
    assert row["ours"]["ms"] > 0 and row["oracle"]["ms"] > 0
  assert not jax.config.x64_enabled  # the script's float64 stays inside it


def test_tuning_toy_quick(tmp_path):
  """Every tuner spends its budget against the known optimum; the grid reaches its own
  best; the figure is written."""
  script = load_script("tuning_toy")
  assert script.main(["--quick", "--out", str(tmp_path)]) == 0
  record = assert_results(tmp_path, "tuning_toy")
  summary = record["summary"]
  assert len(summary) == 4 and all(row["seeds"] == 2 for row in summary.values())
  grid = [row for name, row in summary.items() if name.startswith("grid")][0]
  assert grid["grid_best"]["reached"] == 2
  optimum = record["optimum"]["val"]
  assert all(r["best_val"] >= optimum * (1 - 1e-4) for rs in record["runs"].values() for r in rs)
  assert os.path.getsize(tmp_path / "tuning_toy.png") > 10_000


@pytest.mark.slow
def test_hypergrad_accuracy_quick(tmp_path):
  """On the trained model's BHGD problem every certified bound covers the error
  against the dense solve, and 64 CG steps reach it closely."""
  script = load_script("hypergrad_accuracy")
  assert script.main(["--quick", "--out", str(tmp_path)]) == 0
  record = assert_results(tmp_path, "hypergrad_accuracy")
  rows = record["rows"]
  assert {r["solver"] for r in rows} == {"neumann", "cg"}
  assert all(r["bound_holds"] for r in rows), rows
  cg = {r["terms"]: r for r in rows if r["solver"] == "cg"}
  assert cg[64]["rel_error"] < 1e-3 and cg[64]["certified"]
  assert os.path.getsize(tmp_path / "hypergrad_accuracy.png") > 10_000


def test_zero_shot_quick(tmp_path):
  """Plain and dropout trained on text+audio (vision absent from train and valid),
  tested on text+vision: both rows, the paired differences, the table."""
  script = load_script("zero_shot")
  assert script.main(["--quick", "--workdir", str(tmp_path / "work"),
                      "--out", str(tmp_path / "out")]) == 0
  record = assert_results(tmp_path / "out", "zero_shot")
  (point,) = record["points"]
  assert point["conditions"] == {"test": "text+vision", "train": "text+audio"}
  assert set(point["aggregate"]) == {"plain", "dropout"}
  assert point["paired"]["plain"]["dropout"]["test"]["n"] == 1
  saved = json.loads((tmp_path / "work" / "synthetic" / "text+audio__text+vision" / "plain"
                      / "seed0" / "config.json").read_text())
  assert saved["train"]["present"] == ["text", "audio"]
  table = (tmp_path / "out" / "zero_shot.md").read_text()
  assert "| text+audio -> text+vision | dropout |" in table
  pairs = script.mfeat_pairs(("a", "b", "c", "d", "e", "f"), 3)
  assert len(pairs) == 3 and all(len(set(x) & set(y)) == 1 for x, y in pairs)
  assert pairs == script.mfeat_pairs(("a", "b", "c", "d", "e", "f"), 3)  # a fixed sample


def _benchmark_file(tmp_path, data: str) -> str:
  """A generated file in a real layout, big enough for the smoke config's batch:
  MOSI in MulT's aligned layout, MOSEI in MMSA's unaligned one, IEMOCAP in
  MulT's unaligned one."""
  import pickle

  import numpy as np

  from tests import fakes
  rng = np.random.default_rng(0)
  sizes = {"train": 40, "valid": 16, "test": 24}
  if data == "mosei":
    path, records = tmp_path / "unaligned_50.pkl", {
        s: fakes.mmsa_record(n, rng, aligned=False, audio_width=74, vision_width=35)
        for s, n in sizes.items()}
  else:
    name = {"mosi": "mosi_data.pkl", "iemocap": "iemocap_data.pkl"}[data]
    path, records = tmp_path / name, {
        s: fakes.mult_record(data, n, rng, aligned=data == "mosi") for s, n in sizes.items()}
  with open(path, "wb") as f:
    pickle.dump(records, f)
  return str(path)


def test_real_benchmark_quick(tmp_path):
  """One command from the user's file to the field's table (IEMOCAP in MulT's
  unaligned layout, multi-label): compare's outputs copied, every field metric of
  the task in both rows, the file's hash recorded. MOSI's and MOSEI's files are
  checked by ``test_real_benchmark_reads_every_layout``, their field table by
  ``test_field_metrics_of_a_regression_comparison`` (a run each cost 15 s)."""
  import math

  from modalimmune_jax.metrics import FIELD
  script = load_script("real_benchmark")
  path = _benchmark_file(tmp_path, "iemocap")
  assert script.main(["--quick", "--data", "iemocap", "--file", path, "--workdir",
                      str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                      "--methods", "plain", "--seeds", "0"]) == 0
  out = tmp_path / "out" / "iemocap"
  record = assert_results(out, "real_benchmark")
  for name in script.COPIED:
    assert (out / name).stat().st_size > 0
  task = "multilabel"
  field = record["field"]
  assert field["task"] == task and field["metrics"] == list(FIELD[task])
  for metric in field["metrics"]:
    assert list(field["aggregate"][metric]) == ["plain"]
    for row in ("full", "mean missing"):
      entry = field["aggregate"][metric]["plain"][row]
      assert len(entry["values"]) == 1
      assert entry["mean"] is not None and math.isfinite(entry["mean"])
  assert record["file"]["sha256"] == script.sha256(path) and len(record["file"]["sha256"]) == 64
  table = (out / "real_benchmark.md").read_text()
  assert "*mean missing*" in table and f"| {' | '.join(FIELD[task])} |" in table
  assert "the field's metrics" in (out / "comparison.md").read_text().lower()


@pytest.mark.parametrize("data", ["mosi", "mosei", "iemocap"])
def test_real_benchmark_reads_every_layout(tmp_path, data):
  """The script's first step on each generated file (MOSI in MulT's aligned layout,
  MOSEI in MMSA's unaligned one, IEMOCAP in MulT's unaligned one): the data set it
  hands to compare, with the benchmark's task and modalities."""
  script = load_script("real_benchmark")
  dataset = script.check_file(data, _benchmark_file(tmp_path, data), quick=True)
  assert dataset.task == {"mosi": "regression", "mosei": "regression",
                          "iemocap": "multilabel"}[data]
  assert list(dataset.modality_names) == ["text", "audio", "vision"]
  assert len(dataset.splits["train"].labels) == 40


def test_field_metrics_of_a_regression_comparison():
  """compare's field table from two seeds' results: MMSA's columns in order, the
  full and mean-missing rows, mean and std over seeds, MAE and Corr unscaled."""
  from modalimmune_jax import compare
  from modalimmune_jax.metrics import FIELD
  names = FIELD["regression"]
  conditions = [{"name": "full", "kind": "full"}, {"name": "text only", "kind": "removal"}]

  def run(seed, value):
    rows = [dict({m: value + 0.1 * i for m in names}, condition=c["name"])
            for i, c in enumerate(conditions)]
    return {"task": "regression", "config": {"seed": seed},
            "protocol": {"rows": rows, "meta": {"conditions": conditions}}}
  field = compare.field_metrics({"plain": [run(0, 0.5), run(1, 0.7)]})
  assert field["task"] == "regression" and field["metrics"] == list(names)
  entry = field["aggregate"]["MAE"]["plain"]
  assert entry["full"]["mean"] == pytest.approx(0.6) and entry["full"]["values"] == [0.5, 0.7]
  assert entry["mean missing"]["mean"] == pytest.approx(0.7)
  table = "\n".join(compare.render_field(field, [0, 1]))
  assert f"| method | {' | '.join(names)} |" in table
  assert "| plain | 60.00 ± 14.14 |" in table and "0.600 ± 0.141 | 0.600 ± 0.141 |" in table


def test_real_benchmark_bad_file(tmp_path, capsys):
  """A missing or unreadable file: exit with the file named, before anything
  is compiled or any work directory made."""
  script = load_script("real_benchmark")
  work = tmp_path / "work"
  with pytest.raises(SystemExit, match="no such file"):
    script.main(["--data", "mosi", "--file", str(tmp_path / "nope.pkl"),
                 "--workdir", str(work)])
  bad = tmp_path / "mosi_data.pkl"
  bad.write_bytes(b"not a pickle")
  with pytest.raises(SystemExit, match=r"mosi_data\.pkl"):
    script.main(["--data", "mosi", "--file", str(bad), "--workdir", str(work)])
  assert not work.exists()


def test_spearman_interval_resamples_whole_runs():
  """rho of monotone points is 1 with a [1, 1] interval; reversing one run's points
  keeps rho below 1 and widens the interval, whose ends bracket rho; one run: no interval."""
  script = load_script("collapse_vs_robustness")
  points = [{"run": f"r{i}", "severity": 0.1 * (3 * i + j), "robustness": 0.1 * (3 * i + j)}
            for i in range(5) for j in range(3)]
  c = script.spearman(points, resamples=200)
  assert c["rho"] == pytest.approx(1.0) and c["lo"] == pytest.approx(1.0) == c["hi"]
  for p in points[:3]:
    p["robustness"] = -p["robustness"]
  c = script.spearman(points, resamples=200)
  assert c["lo"] < c["rho"] < 1.0 and c["lo"] < c["hi"] <= 1.0
  assert script.spearman(points[:3])["lo"] is None


def test_timing_windows_run_without_the_garbage_collector():
  """``harness.no_gc`` (around every timed window): the collector is off inside
  and back as it was afterwards, also after an error or when it was already off."""
  import gc
  harness = load_script("harness")
  assert gc.isenabled()
  seen = []
  harness.timed_steps(lambda state, x: (seen.append(gc.isenabled()) or state, {}), 0,
                      [(1,), (2,)])
  assert seen == [False, False] and gc.isenabled()
  with pytest.raises(RuntimeError):
    with harness.no_gc():
      raise RuntimeError("inside")
  assert gc.isenabled()
  gc.disable()
  try:
    with harness.no_gc():
      pass
    assert not gc.isenabled()
  finally:
    gc.enable()
