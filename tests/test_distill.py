"""Cross-modal knowledge distillation (reimplementation): the teacher phase inside
the loop, the feature MSE, the student moving towards the teacher, the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modalimmune_jax import data, train
from modalimmune_jax.config import ConfigError, validate_config, with_overrides
from modalimmune_jax.methods import distill as di
from modalimmune_jax.methods.base import ModelFns
from modalimmune_jax.model import MultimodalModel
from modalimmune_jax.step import host_copy, init_state, make_train_step
from tests.helpers import flat, get_config, run_finite_steps

SHAPES = {"text": (1, 5), "audio": (1, 3), "vision": (1, 2)}


def _setup(n=16):
  ds = data.make_synthetic((n, 2, 2), shapes=SHAPES, seed=0)
  make = lambda seed: nnx.split(MultimodalModel(SHAPES, "classification", ds.num_outputs,
                                                hidden=8, num_heads=2, rngs=nnx.Rngs(seed)))
  (graphdef, student), (_, teacher) = make(0), make(1)
  batch = {k: v for k, v in ds.splits["train"].batch(np.arange(n)).items() if k != "index"}
  return (ModelFns(graphdef, tuple(SHAPES), "classification"), student, teacher,
          jax.tree.map(jnp.asarray, batch))


def test_teacher_trains_in_its_phase_then_freezes_and_the_mse_switches_on():
  model, student, teacher, batch = _setup()
  method = di.distill(model, teacher, teacher_steps=2, optimizer=optax.sgd(0.1), weight=3.0)
  state = init_state(student, optax.sgd(0.0), method)
  step = jax.jit(make_train_step(method, optax.sgd(0.0)))
  teachers = [flat(state.method_state.teacher)]
  for s in range(4):
    old = state
    state, metrics = step(state, batch, jax.random.key(s))
    teachers.append(flat(state.method_state.teacher))
    distilling = float(old.method_state.distilling)
    assert distilling == (1.0 if s >= 2 else 0.0)
    # the loss adds weight * mse exactly when distilling
    expect = metrics["task_loss"] + metrics["recon_loss"] + 3.0 * distilling * metrics[
        "distill_mse"]
    np.testing.assert_allclose(metrics["loss"], expect, rtol=1e-5)
  assert not np.allclose(teachers[0], teachers[1]) and not np.allclose(teachers[1], teachers[2])
  np.testing.assert_array_equal(teachers[2], teachers[3])
  np.testing.assert_array_equal(teachers[3], teachers[4])


def test_student_embeddings_move_towards_the_teacher():
  model, student, teacher, batch = _setup()
  opt = optax.adam(1e-2)

  def mse_after(weight, target, steps=15):
    method = di.distill(model, teacher, teacher_steps=1, optimizer=optax.sgd(0.0),
                        weight=weight, target=target)
    state = init_state(student, opt, method)
    state = state._replace(method_state=state.method_state._replace(
        distilling=jnp.ones([], jnp.float32)))
    step = jax.jit(make_train_step(method, opt))
    for s in range(steps):
      state, metrics = step(state, batch, jax.random.key(s))
    out = model.apply(state.params, batch, None, train=False)
    t = di.teacher_targets(model, teacher, batch, target)
    return float(di.feature_mse(out["embeddings"], t, batch["presence"]))

  for target in ("modality", "fused"):
    out = model.apply(student, batch, None, train=False)
    start = float(di.feature_mse(out["embeddings"],
                                 di.teacher_targets(model, teacher, batch, target),
                                 batch["presence"]))
    with_kd, without = mse_after(10.0, target), mse_after(0.0, target)
    assert with_kd < 0.75 * start and with_kd < 0.75 * without, (target, start, with_kd, without)


def test_feature_mse_counts_present_cells_only():
  s = jnp.zeros((2, 3, 4))
  t = jnp.ones((2, 3, 4)).at[0, 1].set(100.0)
  present = jnp.array([[True, False, True], [True, True, True]])
  np.testing.assert_allclose(di.feature_mse(s, t, present), 1.0)
  with pytest.raises(ValueError, match="target"):
    model, _, teacher, _ = _setup()
    di.distill(model, teacher, teacher_steps=1, optimizer=optax.sgd(0.1), target="logits")


@pytest.mark.parametrize("overrides", [{"method.distill.target": "fused",
                                         "method.distill.dropout_rate": 0.3}])
def test_distill_trains_finite_through_the_loop(overrides):
  config = with_overrides(get_config("synthetic", "smoke"),
                          {"method.name": "distill", "train.steps": 4,
                           "method.distill.teacher_fraction": 0.5, **overrides})
  run = train.setup(config)
  teacher0 = flat(host_copy(run.state.method_state.teacher))

  def each(s, metrics):
    assert (metrics["teacher_loss"] > 0) == (s < 2)
  state = run_finite_steps(run, 4, each)
  assert float(host_copy(state.method_state.distilling)) == 1.0
  assert not np.allclose(flat(host_copy(state.method_state.teacher)), teacher0)


def test_config_names_a_bad_distill_key():
  base = with_overrides(get_config("synthetic", "smoke"), {"method.name": "distill"})
  validate_config(base)
  for key, value in (("method.distill.teacher_fraction", 1.0),
                     ("method.distill.teacher_fraction", 0.0),
                     ("method.distill.target", "logits"), ("method.distill.weight", -1.0)):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(with_overrides(base, {key: value}))
