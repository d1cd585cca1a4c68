"""Balanced multimodal learning (OPM, OGM-GE): the per-modality scores, OPM's drop
probabilities, draws and rescaling, OGM-GE's coefficient, gradient scaling and GE
noise, training through the real loop, and 4 devices against one."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modalimmune_jax import data, train
from modalimmune_jax.config import ConfigError, validate_config, with_overrides
from modalimmune_jax.masking import remove_modalities
from modalimmune_jax.methods import balance as bal
from modalimmune_jax.methods import ogm_ge as og
from modalimmune_jax.methods import opm as op
from modalimmune_jax.methods.base import ModelFns
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.model import MultimodalModel
from tests.helpers import ROOT, get_config, run_finite_steps

SHAPES = {"a": (3, 4), "b": (1, 3)}  # a sequence and a vector modality


def _model_and_batch(n=8, shapes=SHAPES, task="classification", seed=0, **parts):
  ds = data.make_synthetic((n, 2, 2), shapes=shapes, task=task, seed=seed)
  model = MultimodalModel(shapes, task, ds.num_outputs, hidden=8, num_heads=2,
                          rngs=nnx.Rngs(seed), **parts)
  graphdef, params = nnx.split(model)
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return (ModelFns(graphdef, tuple(shapes), task), params, jax.tree.map(jnp.asarray, batch))


# ------------------------------------------------------------------ scores ----

def test_sample_scores_are_the_codes_softmax_of_the_label_and_our_regression_analogue():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(bal.sample_scores("classification", logits, labels),
                             jax.nn.softmax(logits)[jnp.arange(2), labels], rtol=1e-6)
  y, yhat = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0])
  np.testing.assert_allclose(bal.sample_scores("regression", yhat, y, "l1"),
                             np.exp(-np.abs([0.5, 2.0])), rtol=1e-6)
  np.testing.assert_allclose(bal.sample_scores("regression", yhat, y, "mse"),
                             np.exp(-np.array([0.25, 4.0])), rtol=1e-6)
  two_way = jnp.zeros((2, 3, 2)).at[:, :, 1].set(jnp.log(3.0))  # p(label 1) = 3/4 each
  np.testing.assert_allclose(bal.sample_scores("multilabel", two_way, jnp.ones((2, 3), int)),
                             [0.75, 0.75], rtol=1e-6)


@pytest.mark.parametrize("parts", [{}, {"reconstruction": True, "property_vectors": True}])
def test_unimodal_outputs_are_the_protocols_removals(parts):
  """Presence off after the encoders gives the outputs of remove_modalities."""
  model, params, batch = _model_and_batch(shapes={"a": (1, 4), "b": (1, 3)}, **parts)

  @jax.jit
  def both(params, batch):
    got = bal.unimodal_outputs(model, params, batch, train=False)
    want = jnp.stack([model.apply(params, remove_modalities(batch, jnp.eye(2, dtype=bool)[j],
                                                            model.names), train=False)["outputs"]
                      for j in range(2)])
    return got, want

  got, want = both(params, batch)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got[0], got[1])
  scores = bal.modality_scores(model, params, batch, train=False)
  probs = jax.nn.softmax(want, -1)[:, jnp.arange(8), batch["labels"]]
  np.testing.assert_allclose(scores, probs.sum(1), rtol=1e-5)


def test_score_ratios_against_the_sum_or_the_smallest_of_the_others():
  s = jnp.array([6.0, 2.0, 1.0])
  np.testing.assert_allclose(bal.score_ratios(s, "sum"), [2.0, 2 / 7, 1 / 8], rtol=1e-6)
  np.testing.assert_allclose(bal.score_ratios(s, "min"), [6.0, 2.0, 0.5], rtol=1e-6)
  two = jnp.array([3.0, 2.0])
  for ref in bal.REFERENCES:  # two modalities: score / the other score (the papers' code)
    np.testing.assert_allclose(bal.score_ratios(two, ref), [1.5, 2 / 3], rtol=1e-6)


# --------------------------------------------------------------------- OPM ----

def _calcu_q(p1, p2, q_base, lam):
  """GeWu-Lab/BML_TPAMI2024 code/models/Classifier.py:58-72, in numpy."""
  r1, r2 = np.tanh(max(p1 / p2 - 1, 0)), np.tanh(max(p2 / p1 - 1, 0))
  q = np.array([q_base * (1 + lam * r1) if r1 > 0 else 0,
                q_base * (1 + lam * r2) if r2 > 0 else 0])
  return np.clip(q, 0.0, 1.0)


@pytest.mark.parametrize("p1,p2,q_base,lam", [(30.0, 20.0, 0.5, 0.5), (5.0, 20.0, 0.4, 1.0),
                                              (40.0, 4.0, 0.9, 1.0), (7.0, 7.0, 0.5, 0.5)])
def test_drop_probabilities_are_calcu_q(p1, p2, q_base, lam):
  q, _ = op.drop_probabilities(bal.score_ratios(jnp.array([p1, p2]), "sum"), q_base, lam)
  np.testing.assert_allclose(q, _calcu_q(p1, p2, q_base, lam), rtol=1e-6)


def test_opm_drops_only_the_dominant_modality_at_the_coded_rate():
  q = jnp.array([0.6, 0.0, 0.0])
  n, draws, p_exe = 16, 4000, 0.7
  keys = jax.random.split(jax.random.key(0), draws)
  drop, execute, theta = jax.jit(jax.vmap(lambda k: op.opm_drops(k, q, p_exe, n)))(keys)
  drop, execute, theta = map(np.asarray, (drop, execute, theta))
  assert not drop[..., 1:].any()  # the others: never
  rate = drop[..., 0].mean()  # p_exe * q_m per cell
  sigma = np.sqrt(rate * (1 - rate) / (draws * n)) * 4  # cells of a batch are correlated
  assert abs(rate - p_exe * 0.6) < 5 * sigma, rate
  assert abs(execute.mean() - p_exe) < 5 * np.sqrt(p_exe * (1 - p_exe) / draws)
  assert not drop[~execute].any()  # one decision per batch
  np.testing.assert_allclose(theta, np.where(execute, 0.2, 0.0), rtol=1e-6)  # mean q
  off, executed, _ = op.opm_drops(keys[0], q, 1.0, n, active=False)  # warm-up
  assert not bool(off.any()) and not bool(executed)


def test_opm_hook_zeroes_the_dropped_cells_and_divides_by_one_minus_theta():
  z = jax.random.normal(jax.random.key(0), (5, 3, 4))
  present = jnp.ones((5, 3), bool)
  drop = jnp.zeros((5, 3), bool).at[jnp.array([0, 3]), 0].set(True)
  out, pres = op.opm_hook(drop, jnp.float32(0.25))(z, present)
  np.testing.assert_allclose(out, jnp.where(drop[..., None], 0.0, z) / 0.75, rtol=1e-6)
  np.testing.assert_array_equal(pres, present)  # the fusion reads the zeros (the code)
  _, missing = op.opm_hook(drop, jnp.float32(0.25), drop_as_missing=True)(z, present)
  np.testing.assert_array_equal(missing, present & ~drop)


def test_opm_loss_is_the_supervised_loss_on_the_modulated_embeddings():
  model, params, batch = _model_and_batch(n=16)
  s = op.Settings(q_base=0.8, lam=0.5, p_exe=1.0, warmup_steps=3)
  method = op.opm(model, s)
  rng = jax.random.key(5)

  @jax.jit
  def run(params, batch, step):
    total, _, metrics = method.loss(params, step, batch, rng)
    k_drop, k_model = jax.random.split(rng)
    scores = bal.modality_scores(model, params, batch, k_model)
    q, _ = op.drop_probabilities(bal.score_ratios(scores, "sum"), s.q_base, s.lam)
    drop, _, theta = op.opm_drops(k_drop, q, s.p_exe, 16, step >= s.warmup_steps)
    want, _, _ = supervised_loss(model, params, batch, k_model, 1.0,
                                 hook=op.opm_hook(drop, theta))
    return total, want, metrics, q

  total, want, metrics, q = run(params, batch, jnp.int32(3))
  assert float(total) == float(want)
  dominant = int(jnp.argmax(q))
  assert float(q[dominant]) >= 0.8 and float(q[1 - dominant]) == 0.0
  assert float(metrics["opm/executed"]) == 1.0 and float(metrics["opm/dropped_fraction"]) > 0
  np.testing.assert_allclose(float(metrics["opm/theta"]), float(q.mean()), rtol=1e-6)
  total, want, metrics, _ = run(params, batch, jnp.int32(2))  # warm-up: plain training
  plain, _, _ = jax.jit(lambda p, b: supervised_loss(model, p, b, rng, 1.0))(params, batch)
  assert float(total) == float(want) and float(metrics["opm/executed"]) == 0.0
  np.testing.assert_allclose(float(total), float(plain), rtol=1e-6)


# ------------------------------------------------------------------ OGM-GE ----

def test_ogm_coefficient_is_main_py_eq_10():
  rho = jnp.array([0.5, 1.0, 1.0001, 1.5, 3.0])
  for alpha in (0.1, 0.8, 2.6):
    want = np.where(np.asarray(rho) > 1, 1 - np.tanh(alpha * np.maximum(np.asarray(rho), 0)), 1)
    np.testing.assert_allclose(og.coefficients(rho, alpha), want, rtol=1e-6, atol=1e-6)
  # relu of rho itself (main.py:120): k jumps to 1 - tanh(alpha) as rho crosses 1
  np.testing.assert_allclose(og.coefficients(jnp.array([1.0 + 1e-6]), 0.8), 1 - np.tanh(0.8),
                             rtol=1e-5)
  assert og.modulation_window(jnp.int32(5), 5, 5) and not og.modulation_window(jnp.int32(6), 5, 5)
  assert og.modulation_window(jnp.int32(10 ** 6), 0, None)


def _path_name(path):
  return "/".join(og._key_name(k) for k in path)


def _grad_fn(model, settings, ends=None):
  """``(params, batch, rng, step) -> (OGM-GE gradient, plain gradient, metrics)``,
  one compiled program."""
  method = og.ogm_ge(model, settings, ends)

  @jax.jit
  def run(params, batch, rng, step):
    g, metrics = jax.grad(lambda p: method.loss(p, step, batch, rng)[::2], has_aux=True)(params)
    plain = jax.grad(lambda p: supervised_loss(model, p, batch, None, 1.0)[0])(params)
    return g, plain, metrics

  return run


def _split(tree, names):
  """``{path: (modality index or None, leaf)}``."""
  return {_path_name(p): (og.encoder_kernel(p, names), x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_ogm_scales_the_encoder_kernels_gradient_by_k_and_nothing_else():
  """Without GE: the gradient of encoder m's kernels is k_m times the plain one,
  every other gradient unchanged, the reconstruction generator on (its context
  reads the encoders' embeddings, so both paths are scaled); after the window
  (``modulation_ends = 0``, step 1) the plain gradient."""
  model, params, batch = _model_and_batch(n=16, reconstruction=True)
  run = _grad_fn(model, og.Settings(ge=False, alpha=0.8), ends=0)
  g, plain, metrics = run(params, batch, jax.random.key(1), jnp.int32(0))
  coeffs = [float(metrics[f"coeff/{n}"]) for n in model.names]
  assert min(coeffs) < 1.0 and max(coeffs) == 1.0  # one dominant modality (two modalities)
  kernels = 0
  plain_leaves = _split(plain, model.names)
  for path, (m, gl) in _split(g, model.names).items():
    pl = plain_leaves[path][1]
    want = pl if m is None else coeffs[m] * pl
    np.testing.assert_allclose(gl, want, rtol=1e-5, atol=1e-9, err_msg=path)
    kernels += m is not None
  assert kernels == 7 + 2  # a: proj, query, key, value, out, fc1, fc2; b: proj, hidden
  g_off, _, m_off = run(params, batch, jax.random.key(1), jnp.int32(1))
  assert float(m_off["ogm/active"]) == 0.0
  assert all(float(m_off[f"coeff/{n}"]) == 1.0 for n in model.names)
  for a, b in zip(jax.tree.leaves(g_off), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_ge_noise_has_each_gradient_tensors_std_on_encoder_kernels_only():
  """``grad - k grad_plain`` on an encoder kernel is N(0, std(grad_plain) + 1e-8)
  (pooled over kernels and keys, normalised by each tensor's std); every other
  gradient is the plain one; the same step key draws the same noise."""
  model, params, batch = _model_and_batch(n=16, shapes={"a": (1, 40), "b": (1, 30)})
  run = _grad_fn(model, og.Settings(alpha=0.8))
  normalised = []
  for seed in range(3):
    g, plain, metrics = run(params, batch, jax.random.key(seed), jnp.int32(0))
    coeffs = [float(metrics[f"coeff/{n}"]) for n in model.names]
    plain_leaves = _split(plain, model.names)
    for path, (m, gl) in _split(g, model.names).items():
      gl, pl = np.asarray(gl, np.float64), np.asarray(plain_leaves[path][1], np.float64)
      if m is None:  # not an encoder kernel: untouched
        np.testing.assert_allclose(gl, pl, rtol=1e-5, atol=1e-9, err_msg=path)
        continue
      noise = gl - coeffs[m] * pl
      normalised.append(np.ravel(noise / (np.std(pl, ddof=1) + og.NOISE_FLOOR)))
    if seed == 0:
      first = g
  x = np.concatenate(normalised)
  assert x.size == 3 * (40 * 8 + 8 * 8 + 30 * 8 + 8 * 8)
  assert abs(x.mean()) < 5 / np.sqrt(x.size), x.mean()
  assert abs(x.std() - 1.0) < 5 / np.sqrt(2 * x.size), x.std()
  again, _, _ = run(params, batch, jax.random.key(0), jnp.int32(0))  # the step's key
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_config_errors_name_the_key():
  base = get_config("synthetic", "smoke")
  for name, key, value in (("opm", "method.opm.q_base", 1.5), ("opm", "method.opm.p_exe", -0.1),
                           ("ogm_ge", "method.ogm_ge.modulation_ends", -2),
                           ("ogm_ge", "method.ogm_ge.reference", "mean")):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(with_overrides(base, {"method.name": name, key: value}))
  with pytest.raises(ConfigError, match=r"method\.ogm_ge\.modulation_ends"):
    validate_config(with_overrides(base, {"method.name": "ogm_ge",
                                          "method.ogm_ge.modulation_starts": 5,
                                          "method.ogm_ge.modulation_ends": 4}))


# ------------------------------------------------------- through the loop ----

@pytest.mark.parametrize("name,overrides", [
    ("opm", {"method.opm.warmup_steps": 1, "method.opm.p_exe": 1.0}),
    ("ogm_ge", {"method.ogm_ge.modulation_ends": 1})])
def test_trains_finite_through_the_loop(name, overrides):
  config = with_overrides(get_config("synthetic", "smoke"),
                          {"method.name": name, "train.steps": 3, **overrides})
  run = train.setup(config)
  seen = []

  def each(s, metrics):
    seen.append(metrics)
    assert all(f"score/{n}" in metrics for n in ("text", "audio", "vision"))
    if name == "opm":
      assert metrics["opm/executed"] == float(s >= 1)
    else:
      assert metrics["ogm/active"] == float(s <= 1)
  state = run_finite_steps(run, 3, each)
  assert int(state.method_state) == 3


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
  """OPM (per-sample drops drawn for the global batch, psum-ed scores) and
  OGM-GE (scaling and noise on the global gradient) give the same SGD update
  on 4 devices as on one."""
  script = """
import sys
import numpy as np
from tests.dp_worker import run_steps, worker_config
res = {}
for name in ("opm", "ogm_ge"):
  def config():
    c = worker_config(name)
    # two modalities, so that OPM has a dominant one to drop (three: rarely)
    c.data.synthetic.shapes = {"text": (1, 6), "audio": (2, 4)}
    c.data.synthetic.modalities = ("text", "audio")
    c.model.hidden, c.model.num_heads = 8, 2
    c.method.opm.warmup_steps, c.method.opm.p_exe, c.method.opm.q_base = 1, 1.0, 0.6
    return c
  res["many_" + name], n, _ = run_steps(config(), steps=2)
  res["one_" + name], _, _ = run_steps(config(), num_devices=1, steps=2)
np.savez(sys.argv[1], devices=n, **res)
"""
  out = str(tmp_path / "balance.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True,
                        timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = np.load(out)
  assert int(res["devices"]) == 4
  for name in ("opm", "ogm_ge"):
    assert not np.allclose(res[f"one_{name}"], 0.0)
    np.testing.assert_allclose(res[f"many_{name}"], res[f"one_{name}"], rtol=2e-5, atol=2e-6,
                               err_msg=name)
