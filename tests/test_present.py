"""``train.present``: training with some modalities absent (zero-shot cross-modal).

The modalities not listed are absent from the train and valid splits (removed
as the protocol removes a modality, ``masking.remove_modalities``): from every
training batch in both pipelines, from what a method draws (ModalImmune's BHGD
and controller batches), under every protocol condition on valid; the test
split keeps every modality.

    python -m pytest -q -n 0 tests/test_present.py
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import build, protocol, train
from modalimmune_jax.config import (ConfigError, trained_differences, validate_config,
                                    with_overrides)
from modalimmune_jax.masking import remove_modalities
from modalimmune_jax.methods import modalimmune as mi
from modalimmune_jax.step import (device_data, gather_batch, make_mesh, shard_batch,
                                  split_arrays)
from tests.helpers import ROOT, flat, get_config

PRESENT = ("text", "audio")  # vision absent
KEEP = np.array([True, True, False])
QUICK_EVAL = {"eval.removals": "none", "eval.missing_rates": (), "eval.snrs_db": (),
              "checkpoint.enabled": False}


def _config(**overrides):
  return with_overrides(get_config(), {"train.present": PRESENT, **overrides})


def _assert_equal(a, b):
  a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _removed(batch, names):
  return remove_modalities(batch, KEEP, names)


def test_training_batches_are_remove_modalities_of_the_full_ones():
  """Host batches (``Batches``, the host pipeline's ``gather_batch``) and the device
  pipeline's gather equal ``remove_modalities`` of the batches without the pattern;
  valid is patterned too (under every protocol condition), test is not."""
  config = _config()
  full = build.load_data(with_overrides(config, {"train.present": ()}))
  seen = build.load_data(config)
  names = seen.modality_names
  assert names == ("text", "audio", "vision")
  assert seen.splits["train"].absent == seen.splits["valid"].absent == ("vision",)
  rows = np.arange(full.splits["test"].num_samples)
  _assert_equal(seen.splits["test"].batch(rows), full.splits["test"].batch(rows))
  assert not seen.splits["test"].absent
  batches = train.Batches(seen.splits["train"], config.train.batch_size, config.seed)
  plain = train.Batches(full.splits["train"], config.train.batch_size, config.seed)
  host = split_arrays(seen.splits["train"])
  dev = device_data(seen.splits["train"], make_mesh(1))
  gather = jax.jit(gather_batch)
  for s in (0, 7, 8, 13):  # across an epoch boundary (8 batches of 16 per epoch)
    want = _removed(plain(s), names)
    _assert_equal(batches(s), want)
    idx = batches.indices(s)[0]
    _assert_equal(gather_batch(host, idx), want)
    _assert_equal(gather(dev, jnp.asarray(idx)), want)
    assert not batches(s)["presence"][:, 2].any() and not batches(s)["inputs"]["vision"].any()
  valid = full.splits["valid"]
  _assert_equal(seen.splits["valid"].batch(np.arange(5)),
                dict(_removed(valid.batch(np.arange(5)), names), index=np.arange(5)))
  # the protocol's conditions on valid apply on top of the pattern
  for cond in protocol.standard_conditions(names, (0.5,)):
    split, presence = cond.apply(seen.splits["valid"], seed=0)
    _, presence0 = cond.apply(valid, seed=0)
    np.testing.assert_array_equal(presence, presence0 & KEEP)
    assert not split.modalities["vision"].any() and not split.masks["vision"].any()


def test_modalimmune_draws_have_the_pattern():
  """ModalImmune's fixed BHGD batches (train and every valid condition) and its
  held-out controller batch: vision absent everywhere, the rest as without it."""
  config = _config()
  full = build.load_data(with_overrides(config, {"train.present": ()}))
  seen = build.load_data(config)
  names = seen.modality_names
  tr, val = mi.hyper_batches(seen, 16, seed=0, removals="drop_one", missing_rates=(0.5,))
  tr0, val0 = mi.hyper_batches(full, 16, seed=0, removals="drop_one", missing_rates=(0.5,))
  _assert_equal(tr, _removed(tr0, names))
  for p in range(val["presence"].shape[0]):  # full, 3 drop-one, random 0.5
    one = lambda b: jax.tree.map(lambda x: x[p], b)
    _assert_equal(one(val), _removed(one(val0), names))
  ctrl, ctrl0 = mi.controller_batch(seen, 32, 0), mi.controller_batch(full, 32, 0)
  _assert_equal(ctrl, _removed(ctrl0, names))


def test_host_and_device_pipelines_train_identically(tmp_path):
  runs = {}
  for where in ("host", "device"):
    config = _config(**QUICK_EVAL, **{"train.device_data": where})
    runs[where] = train.train_and_evaluate(config, str(tmp_path / where))
  np.testing.assert_array_equal(flat(runs["host"]["final_params"]),
                                flat(runs["device"]["final_params"]))
  assert runs["host"]["protocol"] == runs["device"]["protocol"]
  # trained on text+audio only: the vision encoder never had a gradient, so Adam moved
  # it by weight decay alone, the same factor for every entry
  p0 = train.setup(_config(), num_devices=1).state.params
  w0 = flat(p0["encoders"]["vision"]["proj"]["kernel"])
  w = flat(runs["host"]["final_params"]["encoders"]["vision"]["proj"]["kernel"])
  ratio = w[w0 != 0] / w0[w0 != 0]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
  assert 0.99 < ratio[0] < 1.0


def test_plain_gradient_of_the_absent_encoder_is_exactly_zero():
  """The whole vision encoder's gradient is 0 on a patterned batch (its input is
  zero, its presence off), and not 0 on the same batch without the pattern."""
  run = train.setup(_config(), num_devices=1)
  unpatterned = train.setup(_config(**{"train.present": ()}), num_devices=1)
  rng = jax.random.key(0)

  def grads(r):
    batch = shard_batch(r.batches(3), r.mesh)
    loss = lambda p: r.method.loss(p, r.state.method_state, batch, rng)[0]
    return jax.grad(loss)(r.state.params)

  g, g0 = grads(run), grads(unpatterned)
  vision = flat(g["encoders"]["vision"])
  assert vision.size and not vision.any()
  assert flat(g["encoders"]["text"]).any() and flat(g["encoders"]["audio"]).any()
  assert flat(g0["encoders"]["vision"]["proj"]["kernel"]).any()


def test_bad_values_name_the_key():
  for bad in (("text", "text"), ("",), (3,), ("text", "smell")):
    with pytest.raises(ConfigError, match="train.present"):
      validate_config(_config(**{"train.present": bad}))
  with pytest.raises(ConfigError, match="train.present"):  # the data set's own names
    build.training_view(_config(**{"train.present": ("fou",)}),
                        build.load_data(get_config()))


def test_runs_made_before_the_key_trained_on_every_modality():
  """A work directory's config.json without ``train.present`` (written before the key
  existed) is a run of ``()``: it resumes and is reused as is, and differs from a
  pattern's run in that key alone."""
  old = json.loads(get_config().to_json_best_effort())
  del old["train"]["present"]
  assert trained_differences(old, get_config()) == []
  assert [k for k, _, _ in trained_differences(old, _config())] == ["train.present"]


def test_command_line_error_exits_2_before_anything(tmp_path):
  """mfeat's views are known only once it is loaded: still one line, exit 2, no directory."""
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "modalimmune_jax.main",
       "--config=experiments/configs/mfeat.py:smoke", f"--workdir={workdir}",
       "--config.train.present=('fou','text')"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 2, proc.stderr[-1500:]
  assert lines[-1].startswith("error: ") and "train.present" in lines[-1], lines
  assert "Traceback" not in proc.stderr and not workdir.exists()
