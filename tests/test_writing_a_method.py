"""docs/method.md's complete example method, run as written: registered from its
own file, validated, and trained for a few steps through ``main`` and ``compare``
(beside ``plain``) without editing any other file."""

import json
import os
import re
import subprocess
import sys

import pytest

from modalimmune_jax.config import ConfigError, validate_config, with_overrides
from tests.helpers import ROOT

DOC = os.path.join(ROOT, "docs", "method.md")
# a few steps of a small model (the example's own config trains 600)
SMALL = ["--config.train.steps=4", "--config.train.batch_size=16", "--config.train.log_every=2",
         "--config.train.eval_every=0", "--config.checkpoint.every=2",
         "--config.model.hidden=16", "--config.model.num_heads=2",
         "--config.eval.missing_rates=(0.5,)", "--config.eval.snrs_db=(0.0,)",
         "--config.eval.removals=drop_one"]


def example_source() -> str:
  with open(DOC) as f:
    text = f.read()
  block = re.search(r"<!-- example: l2_fused.py -->\n```python\n(.*?)```\n<!-- end example -->",
                    text, re.S)
  assert block, "docs/method.md lost its example block"
  return block.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  from modalimmune_jax import methods
  path = tmp_path_factory.mktemp("example") / "l2_fused.py"
  path.write_text(example_source())
  yield path
  methods.unregister("l2_fused")  # the other tests in this process see the built-in ones


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("l2_fused_example", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_the_example_registers_its_section_with_rules(example):
  from modalimmune_jax import methods
  module = _load(example)
  config = module.get_config()
  assert methods.get("l2_fused") is module.SPEC
  assert config.method.l2_fused.weight == 0.01
  validate_config(config)
  with pytest.raises(ConfigError, match=r"method\.l2_fused\.weight"):
    validate_config(with_overrides(config, {"method.l2_fused.weight": -1.0}))


def _run(args, cwd):
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_the_example_trains_through_main_and_compare(example, tmp_path):
  work = tmp_path / "l2"
  _run(["modalimmune_jax.main", f"--config={example}", f"--workdir={work}", *SMALL], tmp_path)
  with open(work / "results.json") as f:
    record = json.load(f)
  assert record["method"] == "l2_fused" and record["steps"] == 4
  assert 0.0 <= record["protocol"]["rows"][0]["accuracy"] <= 1.0
  with open(work / "metrics.jsonl") as f:
    logs = [json.loads(line) for line in f]
  penalties = [r["l2_fused"] for r in logs if r.get("split") == "train"]
  assert penalties and all(p > 0 for p in penalties)  # the method's own metric, logged

  cmp = tmp_path / "cmp"
  _run(["modalimmune_jax.compare", f"--config={example}", "--methods=plain,l2_fused",
        "--seeds=0", "--notune", "--noreference", f"--workdir={cmp}", *SMALL], tmp_path)
  with open(cmp / "comparison.json") as f:
    table = json.load(f)
  assert list(table["aggregate"]) == ["plain", "l2_fused"]
  assert table["runs"]["l2_fused"][0]["config"]["method"]["l2_fused"]["weight"] == 0.01
