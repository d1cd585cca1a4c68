"""ModalImmune through the real loop: every switch trains, and a stopped run resumes exactly."""

import itertools
import json

import jax
import jax.numpy as jnp
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


def test_held_out_controller_still_sees_the_leaned_on_modality_late_in_training():
  """The constructed case of issue 22: a model trained with modality dropout until its
  training loss is near zero predicts every training sample from any subset, so the
  information gains on training batches vanish and the intensities return to uniform;
  on the held-out controller batch (valid split) the gains still point at the modality
  the model leans on, the synthetic data's dominant one."""
  from modalimmune_jax.methods import modalimmune as mi_lib
  config = get_config("synthetic", "smoke")
  config.data.synthetic.update(num_samples=(32, 256, 8), dominant="audio", noise=0.3,
                               shapes={"text": (1, 8), "audio": (1, 8), "vision": (1, 8)})
  config.train.batch_size = 32
  config.optim.update(learning_rate=1e-2, warmup_steps=10, weight_decay=0.0,
                      schedule="constant")
  config.method.name = "dropout"
  config.method.dropout.rate = 0.5
  run = train.setup(config, num_devices=1)
  state = run_finite_steps(run, 250)
  params, batch = state.params, run.batches(0)  # the whole training split
  logits = run.model.apply(params, batch, None, train=False)["outputs"]
  assert float(run.model.task_loss(logits, batch["labels"])) < 0.05  # near zero

  def intensities(ctrl_data):
    s = mi_lib.Settings(ctrl_data=ctrl_data, collapse=False, interventions=False,
                        curvature_mask=False, bhgd=False)
    held = mi_lib.controller_batch(run.dataset, 256, 0) if ctrl_data == "valid" else None
    method = mi_lib.modalimmune(run.model, s, ctrl_data=held)
    (measure,) = [p.fn for p in method.periodic]
    ms = method.init(params)
    for i in range(3):
      _, ms, _ = jax.jit(measure)(params, None, ms, batch, jax.random.key(i), i)
    return np.asarray(ms.controller.ig), np.asarray(ms.controller.alpha)

  names = list(run.model.names)
  ig_train, alpha_train = intensities("train")
  ig_valid, alpha_valid = intensities("valid")
  assert np.abs(ig_train).max() < 0.05, ig_train           # the training gains vanish ...
  assert alpha_train.max() - alpha_train.min() < 0.05, alpha_train
  assert names[int(np.argmax(ig_valid))] == "audio", ig_valid  # ... the held-out ones do not
  assert ig_valid[names.index("audio")] > 0.2, ig_valid
  assert names[int(np.argmax(alpha_valid))] == "audio" and alpha_valid.max() > 0.6, alpha_valid


def test_bhgd_with_adaptive_terms_applies_a_certified_step_within_its_bound():
  """BHGD's solve stops at the first CG step certified within ``hyper_tol * |g|``
  (at most ``hyper_terms``); the step is applied (Adam's first step: ``-lr sign(g)``
  on the unconstrained meta-parameters), and the hyper-gradient it used is within the
  certified bound of a 400-step reference solve of the same problem."""
  from modalimmune_jax.hypergrad import neumann_hypergrad
  from modalimmune_jax.methods import modalimmune as mi_lib
  config = small_config()
  mi = config.method.modalimmune
  mi.update(hyper_terms=200, hyper_tol=0.1, hyper_every=1, controller=False,
            curvature_mask=False)
  run = train.setup(config, num_devices=1)
  s = mi_lib.Settings(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                         for k, v in mi.to_dict().items()})
  state = run.state.method_state
  (bhgd,) = [p.fn for p in run.method.periodic]
  _, new, _ = jax.jit(bhgd)(run.state.params, None, state, None, jax.random.key(0), 0)
  h = host_copy(new.hyper)
  assert bool(h.accepted) and int(h.applied) == 1 and bool(h.certified)
  assert 1 < int(h.num_terms) < 200
  assert float(h.error_bound) <= 0.1 * float(h.grad_norm)

  inner, outer = mi_lib.bhgd_objectives(run.model.in_float32(), s)
  train_b, val = state.hyper_data
  ref, _ = jax.jit(lambda p, phi: neumann_hypergrad(
      inner, outer, p, phi, inner_args=(train_b, jnp.full((3,), 1 / 3)), outer_args=(val,),
      solver="cg", damping=s.hyper_damping, num_terms=400))(run.state.params, state.phi)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])
  ref, bound = flat(ref), float(h.error_bound)
  assert abs(np.linalg.norm(ref) - float(h.grad_norm)) <= bound * (1 + 1e-3)
  # the applied step is Adam's first, -lr sign(g), with g's signs those of the reference
  # wherever the reference exceeds the bound
  moved = flat(mi_lib.unconstrain(*[h.after[k] for k in mi_lib.META]))
  start = flat(mi_lib.unconstrain(*[h.before[k] for k in mi_lib.META]))
  np.testing.assert_allclose(np.abs(moved - start), s.hyper_lr, rtol=1e-3)
  sure = np.abs(ref) > bound
  assert sure.any()
  np.testing.assert_array_equal(np.sign(moved - start)[sure], -np.sign(ref)[sure])


@pytest.mark.parametrize("variant,fill", [("smoke", True), ("mosi_shaped", False)])
def test_controller_gains_equal_removing_each_modality_from_the_inputs(variant, fill):
  """The controller encodes its batch once and switches each modality's presence off
  after the encoders; its gains equal those of the model run on inputs with that
  modality removed (masking.remove_modalities: features zeroed, frames cleared), on
  vector data and on variable-length sequences, with and without the generator's fill."""
  from modalimmune_jax.masking import remove_modalities
  from modalimmune_jax.methods import modalimmune as mi_lib
  config = get_config("synthetic", variant)
  config.data.synthetic.num_samples = (48, 40, 8)
  config.model.update(hidden=16, reconstruction=fill, property_vectors=fill)
  config.method.name = "modalimmune"
  run = train.setup(config, num_devices=1)
  params, names = run.state.params, run.model.names
  held = mi_lib.controller_batch(run.dataset, 32, 0)
  s = mi_lib.Settings(ctrl_data="valid", collapse=False, interventions=False,
                      curvature_mask=False, bhgd=False)
  method = mi_lib.modalimmune(run.model, s, ctrl_data=held)
  (measure,) = [p.fn for p in method.periodic]
  _, ms, _ = jax.jit(measure)(params, None, method.init(params), run.batches(0),
                              jax.random.key(0), 0)

  def loss_without(keep):
    b = remove_modalities(jax.tree.map(jnp.asarray, held), jnp.asarray(keep), names)
    return run.model.task_loss(run.model.apply(params, b, None, train=False)["outputs"],
                               b["labels"])
  full = float(loss_without(np.ones(len(names), bool)))
  expected = [float(loss_without(~np.eye(len(names), dtype=bool)[j])) - full
              for j in range(len(names))]
  np.testing.assert_allclose(np.asarray(ms.controller.ig), expected, rtol=1e-4, atol=1e-5)
  assert np.abs(expected).max() > 1e-3  # the gains are not all zero
