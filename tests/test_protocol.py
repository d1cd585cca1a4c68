import json
import os

import numpy as np
import pytest

from modalimmune_jax import data, protocol


@pytest.fixture(scope="module")
def split():
  ds = data.make_synthetic((10, 10, 64), shapes={"text": (6, 4), "audio": (5, 3),
                                                 "vision": (1, 2)},
                           variable_length=True, seed=0)
  return ds.splits["test"]


def test_removal_conditions_cover_every_proper_subset(split):
  conds = protocol.removal_conditions(split.modality_names)
  names = [c.name for c in conds]
  assert names == ["text+audio", "text+vision", "audio+vision",
                   "text only", "audio only", "vision only"]
  for c in conds:
    degraded, presence = c.apply(split)
    kept = c.params["kept"]
    for j, m in enumerate(split.modality_names):
      assert presence[:, j].all() == (m in kept) and presence[:, j].any() == (m in kept)
      if m in kept:
        np.testing.assert_array_equal(degraded.modalities[m], split.modalities[m])
        np.testing.assert_array_equal(degraded.masks[m], split.masks[m])
      else:
        assert not degraded.modalities[m].any() and not degraded.masks[m].any()


def test_random_missing_rate_and_reproducibility(split):
  cond = protocol.random_missing(0.5)
  _, p1 = cond.apply(split, seed=3)
  _, p2 = cond.apply(split, seed=3)
  _, p3 = cond.apply(split, seed=4)
  np.testing.assert_array_equal(p1, p2)
  assert not np.array_equal(p1, p3)
  assert p1.any(1).all()  # never every modality missing
  big = data.make_synthetic((10, 10, 4000), seed=0).splits["test"]
  degraded, p = protocol.random_missing(0.3).apply(big, seed=0)
  # P(missing) = 0.3 except for the forced keeps (0.3^3 / 3 per cell)
  assert (1 - p.mean()) == pytest.approx(0.3 - 0.3 ** 3 / 3, abs=0.02)
  for j, m in enumerate(big.modality_names):
    assert not degraded.modalities[m][~p[:, j]].any()


def test_frame_missing_respects_lengths(split):
  degraded, presence = protocol.frame_missing(0.4).apply(split, seed=1)
  assert presence.all()
  for m in split.modality_names:
    x, y, mask = split.modalities[m], degraded.modalities[m], split.masks[m]
    np.testing.assert_array_equal(degraded.masks[m], mask)  # lengths respected
    dropped = (y == 0).all(-1) & ~(x == 0).all(-1)
    assert not (dropped & ~mask).any()  # padding never touched (it is zero anyway)
    kept = ~dropped
    np.testing.assert_array_equal(y[kept], x[kept])
  text_drop = ((degraded.modalities["text"] == 0).all(-1) & split.masks["text"]).sum()
  assert text_drop / split.masks["text"].sum() == pytest.approx(0.4, abs=0.1)
  again, _ = protocol.frame_missing(0.4).apply(split, seed=1)
  np.testing.assert_array_equal(again.modalities["text"], degraded.modalities["text"])
  only_audio, _ = protocol.frame_missing(0.4, ["audio"]).apply(split, seed=1)
  np.testing.assert_array_equal(only_audio.modalities["text"], split.modalities["text"])


def test_gaussian_noise_has_the_requested_snr():
  big = data.make_synthetic((10, 10, 3000), shapes={"a": (3, 8), "b": (1, 4)},
                            variable_length=True, seed=2).splits["test"]
  for snr in (0.0, 10.0):
    degraded, _ = protocol.gaussian_noise(snr).apply(big, seed=0)
    for m in ("a", "b"):
      mask = big.masks[m]
      signal = big.modalities[m][mask]
      noise = degraded.modalities[m][mask] - signal
      measured = 10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2))
      assert measured == pytest.approx(snr, abs=0.1)
      np.testing.assert_array_equal(degraded.modalities[m][~mask], 0)


def test_evaluate_and_render(split):
  def predict(batch):
    # "model": predicts class from the presence pattern only
    return np.eye(4)[batch["presence"].sum(1).astype(int) % 4]

  conds = protocol.standard_conditions(split.modality_names, missing_rates=(0.5,),
                                       frame_rates=(0.2,), snrs_db=(5.0,))
  result = protocol.evaluate(predict, split, conds, batch_size=7, seed=0)
  names = [n for n, _ in result.rows]
  assert names[0] == "full" and "text only" in names and "noise 5 dB" in names
  assert "missing rate 0.5" in names and "frame missing 0.2" in names
  expect_full = np.mean(split.labels == 3)
  assert result.get("full")["accuracy"] == pytest.approx(expect_full)
  assert result.get("text only")["accuracy"] == pytest.approx(np.mean(split.labels == 1))
  md = result.to_markdown(["accuracy", "macro_f1"], digits=3)
  assert md.splitlines()[0] == "| condition | convention | accuracy | macro_f1 |"
  assert len(md.splitlines()) == 2 + len(conds)
  parsed = json.loads(result.to_json())
  assert parsed["rows"][0]["condition"] == "full"
  assert parsed["meta"]["conditions"][1]["params"] == {"kept": ["text", "audio"]}
  again = protocol.evaluate(predict, split, conds, batch_size=7, seed=0)
  assert again.to_json() == result.to_json()


def test_plot_protocol_writes_png(split, tmp_path):
  from modalimmune_jax.plots import plot_protocol
  conds = [protocol.full()] + protocol.keep_one_conditions(split.modality_names)
  a = protocol.evaluate(lambda b: np.eye(4)[b["presence"].sum(1) % 4], split, conds)
  b = protocol.evaluate(lambda b: np.eye(4)[np.zeros(len(b["labels"]), int)], split, conds)
  for name, results in (("one.png", a), ("two.png", {"a": a, "b": b})):
    path = plot_protocol(results, "accuracy", str(tmp_path / name))
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000


# ------------------------------------------------ the field's conventions ----

def _gcnet_random_mask(rng, view_num, input_len, missing_rate):
  """GCNet's ``random_mask`` (after CPM-Net's ``get_sn``), rewritten from its
  description in ../shared/BASELINES.md and the GCNet code: one modality kept per
  sample, extra cells kept by a Bernoulli with an overlap-corrected rate in whole
  percent, the whole mask redrawn until the kept fraction is within 0.005."""
  one_rate = 1 - missing_rate
  while True:
    preserve = np.eye(view_num)[rng.integers(0, view_num, input_len)]
    one_num = view_num * input_len * one_rate - input_len
    ratio = one_num / (view_num * input_len)
    it = rng.integers(0, 100, (input_len, view_num)) < int(ratio * 100)
    a = np.sum((it + preserve) > 1)
    ratio = one_num / (1 - a / one_num) / (view_num * input_len)
    it = rng.integers(0, 100, (input_len, view_num)) < int(ratio * 100)
    matrix = (it + preserve) > 0
    if abs(one_rate - matrix.mean()) < 0.005:
      return matrix


def _pattern_freq(presence):
  """Frequency of each of the 2^M keep patterns (row -> integer code)."""
  m = presence.shape[1]
  codes = presence.astype(int) @ (1 << np.arange(m))
  return np.bincount(codes, minlength=1 << m) / len(codes)


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.3, 0.5, 2 / 3])
def test_cell_missing_hits_eta_and_never_empties_a_sample(split, eta):
  n, m = split.num_samples, len(split.modality_names)
  for seed in range(5):
    degraded, presence = protocol.cell_missing(eta, m).apply(split, seed=seed)
    # exactly round(eta * N * M) missing cells: the target up to one cell's rounding
    assert (~presence).sum() == round(eta * n * m)
    assert abs((1 - presence.mean()) - eta) <= 0.5 / (n * m) + 1e-12
    assert presence.any(1).all()
    for j, name in enumerate(split.modality_names):
      assert not degraded.modalities[name][~presence[:, j]].any()
      assert not degraded.masks[name][~presence[:, j]].any()
  if eta == 2 / 3:  # the largest eta: exactly one modality per sample
    assert (presence.sum(1) == 1).all()


def test_cell_missing_rejects_eta_above_m_minus_one_over_m(split):
  with pytest.raises(ValueError, match=r"\(M-1\)/M"):
    protocol.cell_missing(0.7, 3)
  with pytest.raises(ValueError, match=r"\(M-1\)/M"):
    protocol.cell_missing(0.7).apply(split)  # M known only when applied
  with pytest.raises(ValueError, match=r"\(M-1\)/M"):
    protocol.standard_conditions(split.modality_names, cell_etas=(0.9,))
  two = data.make_synthetic((10, 10, 20), shapes={"a": (1, 2), "b": (1, 2)}, seed=0)
  _, p = protocol.cell_missing(0.5).apply(two.splits["test"])
  assert (p.sum(1) == 1).all()
  with pytest.raises(ValueError):
    protocol.cell_missing(0.6).apply(two.splits["test"])


def test_cell_missing_has_the_distribution_of_gcnets_sampler():
  """Same per-pattern frequencies as GCNet's rejection sampler (whose count is
  within 0.005 of the target; ours is exact) within sampling error."""
  rng = np.random.default_rng(0)
  n, m, eta, reps = 2000, 3, 0.3, 4
  ours = np.concatenate([protocol.cell_eta_mask(rng, n, m, eta) for _ in range(reps)])
  gcnet = np.concatenate([_gcnet_random_mask(rng, m, n, eta) for _ in range(reps)])
  f_ours, f_gcnet = _pattern_freq(ours), _pattern_freq(gcnet)
  assert f_ours[0] == f_gcnet[0] == 0  # no sample loses everything
  sigma = np.sqrt(f_gcnet * (1 - f_gcnet) * 2 / (n * reps)) + 1e-9
  np.testing.assert_array_less(np.abs(f_ours - f_gcnet), 5 * sigma)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
def test_sample_missing_affects_the_target_fraction_of_samples(split, rate):
  n, m = split.num_samples, len(split.modality_names)
  for seed in range(3):
    degraded, presence = protocol.sample_missing(rate).apply(split, seed=seed)
    hit = ~presence.all(1)
    assert hit.sum() == round(rate * n)
    assert presence.any(1).all()
    # the affected samples are split equally between the 6 patterns
    codes = presence[hit].astype(int) @ (1 << np.arange(m))
    counts = np.bincount(codes, minlength=1 << m)[[c for c in range(1, (1 << m) - 1)]]
    assert counts.sum() == hit.sum() and counts.max() - counts.min() <= 1
    for j, name in enumerate(split.modality_names):
      assert not degraded.modalities[name][~presence[:, j]].any()
  _, single = protocol.sample_missing(0.5, "single").apply(split, seed=0)
  assert ((~single).sum(1)[~single.all(1)] == 1).all()
  assert protocol.sample_missing(0.5, "single").name == "sample eta 0.5 (single)"
  # two modalities: MAP's split, half "text missing", half "image missing"
  two = data.make_synthetic((10, 10, 40), shapes={"text": (1, 2), "image": (1, 2)},
                            seed=0).splits["test"]
  _, p = protocol.sample_missing(0.7).apply(two, seed=1)
  assert (~p[:, 0]).sum() == (~p[:, 1]).sum() == 14 and p.any(1).all()
  with pytest.raises(ValueError):
    protocol.sample_missing(1.5)
  with pytest.raises(ValueError):
    protocol.sample_missing(0.5, "both")


def test_conventions_are_named_in_json_and_markdown(split):
  conds = protocol.standard_conditions(split.modality_names, missing_rates=(0.5,),
                                       frame_rates=(0.2,), snrs_db=(5.0,),
                                       removals="keep_one", cell_etas=(0.4,),
                                       sample_rates=(0.7,))
  result = protocol.evaluate(lambda b: np.eye(4)[b["presence"].sum(1) % 4], split, conds)
  expect = {"full": "clean", "text only": "fixed-subset (MMIN)",
            "missing rate 0.5": "independent-cell", "cell eta 0.4": "cell-eta (CPM-Net/GCNet)",
            "sample eta 0.7": "sample-eta (MAP/CMPT)",
            "frame missing 0.2": "frame-rate (MMSA/TFR-Net)", "noise 5 dB": "noise"}
  parsed = json.loads(result.to_json())
  rows = {r["condition"]: r for r in parsed["rows"]}
  meta = {c["name"]: c for c in parsed["meta"]["conditions"]}
  for name, convention in expect.items():
    assert rows[name]["convention"] == convention
    assert meta[name]["convention"] == convention and meta[name]["draws"] == 1
    assert f"| {name} | {convention} |" in result.to_markdown()
  assert meta["cell eta 0.4"]["params"] == {"eta": 0.4}
  assert meta["sample eta 0.7"]["params"] == {"rate": 0.7, "patterns": "any"}
  assert not any(k.endswith("_std") for r in parsed["rows"] for k in r)  # one draw


def test_draws_average_fixed_masks_deterministically(split):
  def predict(batch):
    return np.eye(4)[batch["presence"].sum(1).astype(int) % 4]

  names = split.modality_names
  one = protocol.standard_conditions(names, missing_rates=(0.5,), snrs_db=(), removals="none",
                                     cell_etas=(0.4,))
  base = protocol.evaluate(predict, split, one, seed=2)
  # draws=1 is today's behaviour, whichever way it is asked for
  assert protocol.evaluate(predict, split, one, seed=2, draws=1).to_json() == base.to_json()
  same = protocol.standard_conditions(names, missing_rates=(0.5,), snrs_db=(), removals="none",
                                      cell_etas=(0.4,), draws=1)
  assert protocol.evaluate(predict, split, same, seed=2).to_json() == base.to_json()
  # several draws: mean and spread over the fixed draws, deterministic given the seed
  many = protocol.standard_conditions(names, missing_rates=(0.5,), snrs_db=(), removals="none",
                                      cell_etas=(0.4,), draws=4)
  assert [c.draws for c in many] == [1, 4, 4]  # "full" is not random
  a = protocol.evaluate(predict, split, many, seed=2)
  assert a.to_json() == protocol.evaluate(predict, split, one, seed=2, draws=4).to_json()
  assert a.to_json() == protocol.evaluate(predict, split, many, seed=2).to_json()
  assert a.to_json() != protocol.evaluate(predict, split, many, seed=3).to_json()
  cond = many[1]
  accs = []
  for d in range(4):
    _, presence = cond.apply(split, 2, draw=d)
    accs.append(np.mean(presence.sum(1) % 4 == split.labels))
  assert len({tuple(cond.apply(split, 2, draw=d)[1].ravel()) for d in range(4)}) == 4
  assert a.get("missing rate 0.5")["accuracy"] == pytest.approx(np.mean(accs))
  assert a.spread["missing rate 0.5"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
  # draw 0 is the single draw
  assert base.get("missing rate 0.5")["accuracy"] == pytest.approx(accs[0])
  row = json.loads(a.to_json())["rows"][1]
  assert row["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
  assert "accuracy_std" not in json.loads(a.to_json())["rows"][0]
  assert " ± " in a.to_markdown(["accuracy"]).splitlines()[3]
  with pytest.raises(ValueError):
    protocol.evaluate(predict, split, one, draws=0)


@pytest.mark.parametrize("m,eta", [(3, 0.4), (3, 2 / 3), (2, 0.25)])
def test_jnp_cell_eta_generator_matches_the_protocols(m, eta):
  import jax
  from modalimmune_jax.masking import cell_eta_presence
  n, reps = 1000, 4
  keys = jax.random.split(jax.random.key(0), reps)
  ours = np.concatenate([np.asarray(cell_eta_presence(k, n, m, eta)) for k in keys])
  for r in range(reps):
    block = ours[r * n:(r + 1) * n]
    assert (~block).sum() == round(eta * n * m) and block.any(1).all()
  rng = np.random.default_rng(0)
  ref = np.concatenate([protocol.cell_eta_mask(rng, n, m, eta) for _ in range(reps)])
  f_jnp, f_np = _pattern_freq(ours), _pattern_freq(ref)
  sigma = np.sqrt(f_np * (1 - f_np) * 2 / (n * reps)) + 1e-9
  np.testing.assert_array_less(np.abs(f_jnp - f_np), 5 * sigma)
  # jit with a traced eta draws the same mask as a Python eta
  jitted = jax.jit(cell_eta_presence, static_argnums=(1, 2))
  np.testing.assert_array_equal(jitted(keys[0], n, m, eta), ours[:n])
  with pytest.raises(ValueError):
    cell_eta_presence(keys[0], n, m, (m - 1) / m + 0.01)


@pytest.mark.parametrize("patterns", ["any", "single"])
def test_jnp_sample_eta_generator_matches_the_protocols(patterns):
  import jax
  from modalimmune_jax.masking import sample_eta_presence
  n, m, rate, reps = 999, 3, 0.7, 4
  keys = jax.random.split(jax.random.key(1), reps)
  ours = np.concatenate([np.asarray(sample_eta_presence(k, n, m, rate, patterns))
                         for k in keys])
  for r in range(reps):
    assert (~ours[r * n:(r + 1) * n].all(1)).sum() == round(rate * n)
  rng = np.random.default_rng(0)
  ref = np.concatenate([protocol.sample_eta_mask(rng, n, m, rate, patterns)
                        for _ in range(reps)])
  f_jnp, f_np = _pattern_freq(ours), _pattern_freq(ref)
  sigma = np.sqrt(f_np * (1 - f_np) * 2 / (n * reps)) + 1e-9
  np.testing.assert_array_less(np.abs(f_jnp - f_np), 5 * sigma)
  jitted = jax.jit(sample_eta_presence, static_argnums=(1, 2, 4))
  np.testing.assert_array_equal(jitted(keys[0], n, m, rate, patterns), ours[:n])


def test_cell_and_sample_eta_rules_hold_for_any_shape():
  from hypothesis import given, settings
  from hypothesis import strategies as st

  @settings(max_examples=60, deadline=None)
  @given(n=st.integers(1, 40), m=st.integers(2, 5), frac=st.floats(0, 1),
         seed=st.integers(0, 2 ** 16), rate=st.floats(0, 1))
  def check(n, m, frac, seed, rate):
    eta = frac * (m - 1) / m
    rng = np.random.default_rng(seed)
    p = protocol.cell_eta_mask(rng, n, m, eta)
    assert p.any(1).all() and (~p).sum() == round(eta * n * m)
    q = protocol.sample_eta_mask(rng, n, m, rate)
    assert q.any(1).all() and (~q.all(1)).sum() == round(rate * n)

  check()


def test_eval_config_keys_build_the_conventions_and_are_checked():
  from modalimmune_jax import train
  from modalimmune_jax.config import ConfigError, base_config, validate_config, with_overrides
  names = ("text", "audio", "vision")
  config = with_overrides(base_config(), {"eval.cell_etas": (0.3, 2 / 3),
                                          "eval.sample_rates": (0.7,), "eval.draws": 3,
                                          "eval.removals": "none", "eval.snrs_db": ()})
  validate_config(config)
  conds = train.eval_conditions(config, names)
  assert [(c.name, c.draws) for c in conds] == [
      ("full", 1), ("missing rate 0.3", 3), ("missing rate 0.5", 3), ("missing rate 0.7", 3),
      ("cell eta 0.3", 3), ("cell eta 0.666667", 3), ("sample eta 0.7", 3)]
  # the defaults add nothing: the conditions of before
  default = train.eval_conditions(base_config(), names)
  assert [c.name for c in default] == [c.name for c in protocol.standard_conditions(names)]
  assert all(c.draws == 1 for c in default)
  with pytest.raises(ConfigError, match=r"'eval.cell_etas'.*\(M-1\)/M = 0.5"):
    train.eval_conditions(with_overrides(config, {"eval.cell_etas": (0.6,)}), ("a", "b"))
  for key, value in (("eval.cell_etas", (1.0,)), ("eval.cell_etas", (-0.1,)),
                     ("eval.sample_rates", (1.2,)), ("eval.draws", 0),
                     ("eval.sample_patterns", "both")):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
      validate_config(with_overrides(base_config(), {key: value}))
