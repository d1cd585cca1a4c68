"""Several seeds as one vmapped program (``train.train_seeds``)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from modalimmune_jax import train
from modalimmune_jax.config import ConfigError, validate_config, with_overrides
from modalimmune_jax.methods import plain
from modalimmune_jax.train.run import Run
from modalimmune_jax.train.seeds import one_program
from tests.helpers import flat, get_config

SEEDS = (0, 3)


def _config():
  # synthetic data depend on the seed: each seed trains on its own split
  return with_overrides(get_config(), {"train.steps": 8, "train.log_every": 2,
                                       "checkpoint.every": 2, "train.eval_every": 4})


@pytest.fixture(scope="module")
def together(tmp_path_factory):
  root = tmp_path_factory.mktemp("together")
  dirs = [str(root / f"seed{s}") for s in SEEDS]
  return train.train_seeds(_config(), SEEDS, dirs), dirs


def test_seeds_together_match_separate_runs(together, tmp_path):
  summaries, dirs = together
  assert [s["seeds_together"] for s in summaries] == [list(SEEDS)] * 2
  for seed, summary, workdir in zip(SEEDS, summaries, dirs):
    config = with_overrides(_config(), {"seed": seed})
    alone = train.train_and_evaluate(config, str(tmp_path / f"alone{seed}"))
    # the same run up to float32 reassociation in the batched kernels, which Adam
    # turns into differences of up to about the learning rate on parameters whose
    # gradient is near zero; the logged losses and gradient norms agree closely
    np.testing.assert_allclose(flat(summary["final_params"]), flat(alone["final_params"]),
                               rtol=0, atol=1e-3)
    logged = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
              for d in (workdir, str(tmp_path / f"alone{seed}"))]
    assert len(logged[0]) == len(logged[1])
    for ra, rb in zip(*logged):
      if ra.get("split") == "train":
        for key in ("loss", "grad_norm"):
          np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, err_msg=f"{key} {ra['step']}")
    assert not np.array_equal(flat(summary["final_params"]),
                              flat(together[0][1 - SEEDS.index(seed)]["final_params"]))
    a, b = (json.load(open(os.path.join(d, "results.json")))
            for d in (workdir, str(tmp_path / f"alone{seed}")))
    assert set(a) - set(b) == {"seeds_together"} and not set(b) - set(a)
    assert a["config"] == b["config"] and a["config"]["seed"] == seed
    assert [r["condition"] for r in a["protocol"]["rows"]] == \
        [r["condition"] for r in b["protocol"]["rows"]]
    for ra, rb in zip(a["protocol"]["rows"], b["protocol"]["rows"]):
      assert abs(ra["accuracy"] - rb["accuracy"]) <= 2 / 64 + 1e-9, (ra, rb)
    assert open(os.path.join(workdir, "config.json")).read() == \
        open(str(tmp_path / f"alone{seed}" / "config.json")).read()
    logs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in logs if r.get("split") == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in logs if r.get("split") == "valid"] == [4]


def test_seeds_together_resume_exactly_when_killed_between_their_saves(together, tmp_path):
  """A run stopped at step 4, then one seed's step-4 checkpoint lost (as if killed
  between the seeds' saves): both resume at step 2 and end bit-identical."""
  summaries, _ = together
  dirs = [str(tmp_path / f"seed{s}") for s in SEEDS]
  first = train.train_seeds(with_overrides(_config(), {"train.stop_after": 4}), SEEDS, dirs)
  assert all(s["stopped"] for s in first)
  shutil.rmtree(os.path.join(dirs[1], "checkpoints", "4"))
  resumed = train.train_seeds(_config(), SEEDS, dirs)
  assert [s["start_step"] for s in resumed] == [2, 2]
  assert any(name.startswith("4.") for name in
             os.listdir(os.path.join(dirs[0], "checkpoints.aside")))
  for a, b in zip(resumed, summaries):
    np.testing.assert_array_equal(flat(a["final_state"]), flat(b["final_state"]))


def test_a_method_with_seed_dependent_closures_is_not_vmapped(tmp_path):
  config = with_overrides(get_config(), {"train.steps": 2})
  dataset = train.load_data(config)
  calls = []

  def method(model):  # a constant that differs per seed, hidden in the loss
    calls.append(len(calls))
    base, shift = plain.plain(model), float(len(calls))
    loss = lambda *args, **kw: (lambda t, d, m: (t + shift, d, m))(*base.loss(*args, **kw))
    return base._replace(loss=loss)

  runs = [Run(with_overrides(config, {"seed": s}), str(tmp_path / str(s)), dataset,
                     method, "refuse") for s in SEEDS]
  assert "another program" in one_program(runs)
  same = [Run(with_overrides(config, {"seed": s}), str(tmp_path / f"p{s}"), dataset,
                     None, "refuse") for s in SEEDS]
  assert one_program(same) is None


def test_train_seeds_config_is_checked():
  with pytest.raises(ConfigError, match="train.seeds"):
    validate_config(with_overrides(get_config(), {"train.seeds": (1, 1)}))
  with pytest.raises(ConfigError, match="train.seeds"):
    validate_config(with_overrides(get_config(), {"train.seeds": (-1,)}))
  with pytest.raises(ValueError, match="one work directory per seed"):
    train.train_seeds(get_config(), [0, 1], ["only-one"])


def test_seeds_one_at_a_time_resume_each_from_its_own_checkpoint(tmp_path):
  """Only one program needs the seeds at one step: trained one at a time, a seed
  ahead of the others keeps its newer checkpoint."""
  dirs = [str(tmp_path / f"seed{s}") for s in SEEDS]
  train.train_seeds(with_overrides(_config(), {"train.stop_after": 4}), SEEDS, dirs)
  shutil.rmtree(os.path.join(dirs[1], "checkpoints", "4"))
  resumed = train.train_seeds(_config(), SEEDS, dirs, together=False)
  assert [s["start_step"] for s in resumed] == [4, 2]
  assert not os.path.exists(os.path.join(dirs[0], "checkpoints.aside"))
