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
  assert md.splitlines()[0] == "| condition | accuracy | macro_f1 |"
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
