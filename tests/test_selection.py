"""Model selection on the valid split (eval.select='valid')."""

import json
import os

import jax
import numpy as np

from modalimmune_jax import protocol, train
from modalimmune_jax.checkpoint import Checkpointer
from modalimmune_jax.step import device_batch
from tests.helpers import flat, get_config


def _config():
  config = get_config()
  config.eval.removals = "drop_one"
  config.eval.snrs_db = ()
  config.eval.select = "valid"
  config.train.eval_every = 4
  return config


def test_the_reported_checkpoint_is_the_best_on_valid_and_survives_resume(tmp_path):
  config = _config()
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  sel = full["selection"]
  scores = {int(k): v for k, v in sel["scores_this_session"].items()}
  assert sorted(scores) == [4, 8, 12]
  assert sel["valid_score"] == max(scores.values())
  assert sel["step"] == min(s for s, v in scores.items() if v == sel["valid_score"])
  logged = [json.loads(ln) for ln in open(tmp_path / "full" / "metrics.jsonl")
            if '"split": "valid"' in ln]
  assert [r["selection_score"] for r in logged] == [scores[4], scores[8]]
  # the test table is that of the selected parameters, never of the test split's choice
  run = train.setup(config, num_devices=1)
  predict = train.make_predict_fn(run.graphdef)
  ckpt = Checkpointer(os.path.join(tmp_path, "full", "best"), 1)
  step, state, _, meta = ckpt.restore_latest(run.state, jax.random.key(0))
  ckpt.close()
  assert step == sel["step"] and meta["valid_score"] == sel["valid_score"]
  split = run.dataset.splits[config.eval.split]
  conds = train.eval_conditions(config, run.dataset.modality_names)
  again = protocol.evaluate(lambda b: predict(state.params, device_batch(b)), split, conds,
                            batch_size=config.eval.batch_size, seed=config.eval.seed)
  assert again.to_dict()["rows"] == full["protocol"]["rows"]
  # stopped between validation points and resumed: the same choice and table
  config.train.stop_after = 6
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.train.stop_after = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["selection"]["step"] == sel["step"]
  assert resumed["protocol"]["rows"] == full["protocol"]["rows"]
  np.testing.assert_array_equal(flat(resumed["final_params"]), flat(full["final_params"]))
