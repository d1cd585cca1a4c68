"""ModalImmune through the real loop: every switch trains, and a stopped run resumes exactly."""

import itertools
import json

import jax
import numpy as np
import pytest

from modalimmune_jax import train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.step import host_copy, shard_batch
from modalimmune_jax.tensorboard import read_scalars
from tests.helpers import get_config, run_finite_steps

# The switches of an ablation table (config key -> (on, off) values).
SWITCHES = {
    "method.modalimmune.controller": (True, False),
    "method.modalimmune.collapse": (True, False),
    "method.modalimmune.interventions": (True, False),
    "method.modalimmune.curvature_mask": (True, False),
    "method.modalimmune.bhgd": (True, False),
    "model.reconstruction": (True, False),
    "model.property_vectors": (True, False),
    # collapse is the default, run by the resume and 4-device tests
    "method.modalimmune.intervention": ("drop", "drop_cells"),
    "method.modalimmune.mask_mode": ("hard", "soft"),
}


def covering_rows(num_factors):
  """6 rows of 0/1 settings in which every pair of factors takes all four value
  pairs (a strength-2 covering array): the columns are distinct weight-3 vectors
  of length 6 containing row 0, so no two are equal or complementary."""
  columns = [c for c in itertools.combinations(range(6), 3) if 0 in c][:num_factors]
  assert len(columns) == num_factors, "at most 10 factors"
  return [[int(r in c) for c in columns] for r in range(6)]


def small_config():
  config = get_config("synthetic", "smoke")
  config.method.name = "modalimmune"
  mi = config.method.modalimmune
  mi.ctrl_every, mi.hyper_every, mi.mask_every = 2, 3, 2
  mi.hyper_terms, mi.hyper_batch_size = 4, 16
  config.eval.removals = "none"
  config.eval.missing_rates = ()
  config.eval.snrs_db = ()
  return config


def test_covering_rows_cover_every_pair():
  rows = covering_rows(len(SWITCHES))
  for i, j in itertools.combinations(range(len(SWITCHES)), 2):
    assert {(r[i], r[j]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("row", covering_rows(len(SWITCHES)))
def test_switch_combinations_train_without_nan(row):
  config = with_overrides(small_config(), {key: values[bit] for (key, values), bit
                                           in zip(SWITCHES.items(), row)})
  run = train.setup(config)
  state = run_finite_steps(run, 6)
  leaves = jax.tree.leaves(host_copy(state.params))
  assert all(np.all(np.isfinite(x)) for x in leaves)
  if config.method.modalimmune.bhgd:  # two hyper-steps were taken (steps 3 and 6)
    hyper = host_copy(state.method_state).hyper
    assert int(hyper.applied) + int(hyper.rejected) == 2


def _leaves(tree):
  keys = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
      getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else x
  return [np.asarray(keys(x)) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_stopped_modalimmune_run_resumes_exactly(tmp_path):
  """Params, optimiser state (curvature-mask EMA and key), controller,
  meta-parameters and their optimiser state: bit-identical after a resume, and
  across the two input pipelines (the uninterrupted run gathers its batches on
  the device, and runs the periodic programs on them; the resumed one on the host)."""
  config = small_config()
  config.checkpoint.every = 4
  full = train.train_and_evaluate(with_overrides(config, {"train.device_data": "device"}),
                                  str(tmp_path / "full"))
  config.train.stop_after = 5  # between checkpoints, and between hyper-steps
  first = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert first["stopped"]
  config.train.stop_after = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 5
  a, b = full["final_state"], resumed["final_state"]
  for part in ("params", "opt_state", "method_state"):
    for x, y in zip(_leaves(getattr(a, part)), _leaves(getattr(b, part))):
      np.testing.assert_array_equal(x, y, err_msg=part)
  ms = b.method_state
  assert int(ms.controller.count) == 6 and int(ms.hyper.applied + ms.hyper.rejected) == 4
  log = (tmp_path / "resumed" / "metrics.jsonl").read_text()
  assert log.count('"event": "hypergrad"') == 4 and '"event": "resume"' in log
  # TensorBoard: every number of metrics.jsonl (training, the intensities and
  # meta-parameters, each hyper-step's certificate) and the protocol's headline
  # metrics read back as logged; the resumed run's curves equal the uninterrupted's
  for name, summary in (("full", full), ("resumed", resumed)):
    tb = _tensorboard_matches_the_log(tmp_path / name)
    for row in summary["protocol"]["rows"]:
      assert tb[f"test/accuracy/{row['condition']}"] == [(12, _f32(row["accuracy"]))]
  assert (read_scalars(str(tmp_path / "full"))["train/alpha/text"]
          == read_scalars(str(tmp_path / "resumed"))["train/alpha/text"])


def _f32(x):
  return float(np.float32(x))


def _tensorboard_matches_the_log(workdir):
  """Every finite number of every ``metrics.jsonl`` record is in TensorBoard's
  event files at the record's step, tagged ``<split or event>/<name>``."""
  tb = read_scalars(str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

  def numbers(values, prefix):
    for k, v in values.items():
      if isinstance(v, dict):
        yield from numbers(v, f"{prefix}{k}/")
      elif isinstance(v, (int, float)) and np.isfinite(v):
        yield f"{prefix}{k}", v

  kinds = set()
  for r in records:
    kind = r.get("split") or r.get("event")
    kinds.add(kind)
    rest = {k: v for k, v in r.items() if k not in ("step", "split", "event")}
    for tag, v in numbers(rest, f"{kind}/"):
      assert (r["step"], _f32(v)) in tb[tag], (tag, r["step"], v)
  assert {"train", "hypergrad"} <= kinds
  assert {"train/meta/lambda", "train/alpha/audio", "hypergrad/error_bound",
          "hypergrad/before/kappa"} <= set(tb)
  return tb


def test_drop_cells_with_uniform_intensities_is_dropout_at_p_destroy():
  """``intervention="drop_cells"``, controller off: each cell removed with rate
  p_destroy (minus the rescue of all-removed samples), within sampling error."""
  config = small_config()
  config.data.synthetic.num_samples = (512, 32, 64)
  config.train.batch_size = 512
  mi = config.method.modalimmune
  mi.intervention, mi.controller, mi.p_destroy = "drop_cells", False, 0.4
  mi.bhgd = mi.curvature_mask = False
  run = train.setup(config, num_devices=1)
  batch = shard_batch(run.batches(0), run.mesh)
  loss = jax.jit(lambda p, ms, b, k: run.method.loss(p, ms, b, k)[2]["kept_fraction"])
  kept = np.mean([float(loss(run.state.params, run.state.method_state, batch,
                             jax.random.key(i))) for i in range(4)])
  expected = 1 - (0.4 - 0.4 ** 3 / 3)  # P(removed) = rate - P(all removed) / M
  sigma = np.sqrt(expected * (1 - expected) / (4 * 512 * 3))
  assert abs(kept - expected) < 5 * sigma, (kept, expected)
