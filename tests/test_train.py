import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modalimmune_jax import train
from modalimmune_jax.config import ConfigError, base_config, validate_config
from modalimmune_jax.methods import Method, plain
from modalimmune_jax.step import TrainState, make_train_step
from modalimmune_jax.train.run import Run
from tests.helpers import ROOT, flat, get_config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  config = get_config()
  workdir = str(tmp_path_factory.mktemp("full"))
  return config, train.train_and_evaluate(config, workdir), workdir


def test_smoke_run_writes_results(uninterrupted):
  config, summary, workdir = uninterrupted
  for name in ("results.md", "results.json", "metrics.jsonl", "config.json", "results.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  md = open(os.path.join(workdir, "results.md")).read()
  assert "| full |" in md and "| text only |" in md and "commit:" in md
  assert summary["protocol"]["rows"][0]["condition"] == "full"
  assert np.all(np.isfinite(flat(summary["final_params"])))


def test_resume_equals_uninterrupted(uninterrupted, tmp_path):
  config, full, _ = uninterrupted
  workdir = str(tmp_path)
  config = get_config()
  config.train.stop_after = 7  # not a multiple of checkpoint.every (6)
  first = train.train_and_evaluate(config, workdir)
  assert first["stopped"]
  config.train.stop_after = 0
  second = train.train_and_evaluate(config, workdir)
  assert second["start_step"] == 7 and not second["stopped"]
  np.testing.assert_array_equal(flat(second["final_params"]), flat(full["final_params"]))



def test_tensorboard_switch_off_writes_no_event_files(tmp_path):
  config = get_config()
  config.train.tensorboard = False
  run = Run(config, str(tmp_path), train.load_data(config), None, "refuse")
  run.open(predict=None, grouped=False)
  run.write_log({"step": 1, "split": "train", "loss": 0.5})
  run.close()
  assert os.path.isfile(tmp_path / "metrics.jsonl")
  assert not [f for f in os.listdir(tmp_path) if "tfevents" in f]


def test_resumed_run_steps_with_the_fresh_run_s_program(uninterrupted, tmp_path):
  """The restored state and key are placed as the fresh run's (sharding and
  commitment), so a resume finds its step in the compilation cache: a restored key
  committed to one device where the fresh one was not made XLA compile the step
  again (ModalImmune's smoke resume: jit(step) compiled in 29 s; a cache load
  now, first step 8 s instead of 38 s on this machine)."""
  config, _, workdir = uninterrupted
  data = train.load_data(config)
  resumed = Run(config, workdir, data, None, "refuse")
  assert resumed.restore() == config.train.steps
  fresh = Run(config, str(tmp_path), data, None, "refuse")
  placement = lambda r: [(x.sharding, x.committed)
                         for x in jax.tree.leaves((r.state, r.base_rng))]
  assert placement(resumed) == placement(fresh)

def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")


def _nan_method(prob):
  """Plain training with a NaN injected into the loss with probability ``prob``."""
  def build(model):
    base = plain.plain(model)

    def loss(params, state, batch, rng, axis_name=None):
      total, destructive, metrics = base.loss(params, state, batch, rng, axis_name)
      nan = jnp.where(jax.random.uniform(jax.random.fold_in(rng, 7)) < prob, jnp.nan, 0.0)
      return total + nan, destructive, metrics
    return base._replace(name="nan-injector", loss=loss)
  return build


def test_nonfinite_stop_names_the_step(tmp_path):
  config = get_config()
  config.train.on_nonfinite = "stop"
  config.checkpoint.enabled = False
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss at step 0: 1 bad step.*stopping"):
    train.train_and_evaluate(config, str(tmp_path), method=_nan_method(1.0))


def test_skipped_step_leaves_state_untouched():
  params = {"w": jnp.ones(3)}
  opt = optax.adam(0.1)
  loss = lambda p, state, b, rng, axis_name=None: (jnp.sum(p["w"]) * b, 0.0, {})
  method = Method("scaled-sum", init=lambda p: (), loss=loss)
  step = jax.jit(make_train_step(method, opt))
  state = TrainState(jnp.zeros([], jnp.int32), params, opt.init(params), ())
  s1, m1 = step(state, jnp.nan, jax.random.key(0))
  assert float(m1["nonfinite"]) == 1.0 and int(s1.step) == 1
  np.testing.assert_array_equal(s1.params["w"], params["w"])
  assert int(s1.opt_state[0].count) == 0
  s2, m2 = step(state, 1.0, jax.random.key(0))
  assert float(m2["nonfinite"]) == 0.0 and not np.array_equal(s2.params["w"], params["w"])


def test_config_validation_names_the_key():
  config = base_config()
  validate_config(config)
  with config.unlocked():
    config.train.stepz = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'; did you mean 'train.steps'"):
    validate_config(config)
  config = base_config()
  config.model.dropout = 1.5
  with pytest.raises(ConfigError, match="model.dropout"):
    validate_config(config)
  config = base_config()
  config.data.name = "mosi"
  with pytest.raises(ConfigError, match="data.path"):
    validate_config(config)
  for name in ("synthetic", "mfeat", "mosi", "mosei", "iemocap"):
    for variant in ("", "smoke"):
      c = get_config(name, variant)
      if name in ("mosi", "mosei", "iemocap"):
        c.data.path = "x.pkl"
      validate_config(c)


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "modalimmune_jax.main", *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_command_line_rejects_bad_overrides(tmp_path):
  cfg = "--config=experiments/configs/synthetic.py:smoke"
  bad_key = _main(cfg, f"--workdir={tmp_path}", "--config.train.stepz=3")
  assert bad_key.returncode != 0
  assert "stepz" in bad_key.stderr
  bad_value = _main(cfg, f"--workdir={tmp_path}", "--config.train.steps=many")
  assert bad_value.returncode != 0
  assert "train.steps" in bad_value.stderr or "many" in bad_value.stderr
  bad_choice = _main(cfg, f"--workdir={tmp_path}", "--config.train.regression_loss=huber")
  assert bad_choice.returncode == 2
  assert "train.regression_loss" in bad_choice.stderr


@pytest.mark.parametrize("name,filename,layout", [
    ("mosi", "mosi_data.pkl", "mult"),
    ("mosei", "unaligned_50.pkl", "mmsa"),
    ("iemocap", "iemocap_data_noalign.pkl", "mult"),
])
def test_trains_end_to_end_on_benchmark_layouts(tmp_path, name, filename, layout):
  from tests import fakes
  path = tmp_path / filename
  if layout == "mult":
    fakes.write_mult(path, name, aligned="noalign" not in filename)
  else:
    import pickle
    rng = np.random.default_rng(0)
    data = {s: fakes.mmsa_record(n, rng, aligned=False, audio_width=74, vision_width=35)
            for s, n in fakes.SIZES.items()}
    with open(path, "wb") as f:
      pickle.dump(data, f)
  config = get_config(name, "smoke")
  config.data.path = str(path)
  config.train.steps = 3
  config.train.batch_size = 4
  config.checkpoint.enabled = False
  config.eval.frame_rates = (0.5,)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  rows = {r["condition"]: r for r in summary["protocol"]["rows"]}
  assert {"full", "text only", "frame missing 0.5", "noise 0 dB"} <= set(rows)
  key = {"mosi": "Has0_acc_2", "mosei": "MAE", "iemocap": "acc_4class"}[name]
  low, high = (0.0, 6.0) if key == "MAE" else (0.0, 1.0)  # MOSI/MOSEI labels lie in [-3, 3]
  for condition, row in rows.items():
    value = row[key]
    assert value is not None and np.isfinite(value) and low <= value <= high, (condition, row)


@pytest.mark.slow
def test_curvature_mask_in_the_loop_survives_resume(uninterrupted, tmp_path):
  """A method's optax transformation gets obj_fn in the real step, and its state
  (which holds a typed PRNG key) is checkpointed and restored exactly."""
  from modalimmune_jax.curvature import curvature_mask
  method = lambda model: plain.plain(model)._replace(
      name="masked", transforms=(curvature_mask("hard", refresh_every=2),))
  config = get_config()
  config.eval.removals = "none"
  full = train.train_and_evaluate(config, str(tmp_path / "full"), method=method)
  config.train.stop_after = 5
  train.train_and_evaluate(config, str(tmp_path / "resumed"), method=method)
  config.train.stop_after = 0
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), method=method)
  assert resumed["start_step"] == 5
  np.testing.assert_array_equal(flat(resumed["final_params"]), flat(full["final_params"]))
  _, unmasked, _ = uninterrupted  # the same config without the mask
  assert not np.array_equal(flat(unmasked["final_params"]), flat(full["final_params"]))
  log = open(tmp_path / "resumed" / "metrics.jsonl").read()
  assert '{"event": "resume", "step": 5}' in log


@pytest.mark.parametrize("dominant", ["text", "vision"])
def test_synthetic_order_and_dominant_modality_are_what_the_config_says(dominant):
  """ml-collections sorts dict keys; the modality order and the dominant
  modality come from their own keys, and the dominant one is the most
  informative alone (logistic regression on one modality at a time)."""
  from sklearn.linear_model import LogisticRegression
  config = get_config("synthetic", "")
  config.data.synthetic.dominant = dominant
  dataset = train.load_data(config)
  assert dataset.modality_names == ("text", "audio", "vision")
  assert dataset.meta["dominant"] == dominant
  tr, va = dataset.splits["train"], dataset.splits["valid"]
  acc = {}
  for m in dataset.modality_names:
    clf = LogisticRegression(max_iter=500).fit(tr.modalities[m][:, 0], tr.labels)
    acc[m] = clf.score(va.modalities[m][:, 0], va.labels)
  assert max(acc, key=acc.get) == dominant, acc


def test_synthetic_modality_keys_are_validated():
  config = get_config("synthetic", "")
  config.data.synthetic.modalities = ("text", "audio")
  with pytest.raises(ConfigError, match="data.synthetic.modalities"):
    validate_config(config)
  config = get_config("synthetic", "")
  config.data.synthetic.dominant = "smell"
  with pytest.raises(ConfigError, match="data.synthetic.dominant"):
    validate_config(config)
  config = get_config("synthetic", "")
  config.method.modalimmune.kappa = 1.0
  with pytest.raises(ConfigError, match=r"method.modalimmune.kappa' must be in \(0, 1\)"):
    validate_config(config)
  config = get_config("synthetic", "")
  config.method.name = "modalimune"
  with pytest.raises(ConfigError, match="method.name"):
    validate_config(config)


def test_readme_python_example_runs_and_is_certified():
  import re
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks
  for block in blocks:  # every Python example runs as written
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  assert bool(namespace["cert"].certified) and float(jnp.abs(namespace["g"])) > 0
