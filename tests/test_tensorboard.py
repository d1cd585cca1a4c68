"""TensorBoard event files (issue 20): what is logged reads back."""

import math
import os

import numpy as np
import pytest

from modalimmune_jax.tensorboard import EventWriter, read_scalars


def test_scalars_read_back(tmp_path):
  """Values at several steps read back as written (float32 precision); nested
  dicts give ``a/b`` tags; non-finite and non-numeric values are skipped."""
  logged = {}
  with EventWriter(str(tmp_path), process_index=0) as tb:
    assert tb.enabled
    for step in (0, 10, 25, 100):
      values = {"loss": 1.0 / (step + 1), "lr": np.float32(1e-3 * step),
                "valid": {"MAE": 0.9 - step / 1000, "Corr": np.asarray(0.5)},
                "count": np.int64(step), "nan": math.nan, "inf": -math.inf,
                "name": "mosi", "vector": np.zeros(3), "none": None}
      assert tb.scalars(step, values, prefix="train/") == 5
      for tag, v in [("loss", values["loss"]), ("lr", values["lr"]),
                     ("valid/MAE", values["valid"]["MAE"]), ("valid/Corr", 0.5),
                     ("count", step)]:
        logged.setdefault(f"train/{tag}", []).append((step, float(np.float32(v))))
    tb.scalars(7, {"epoch_time": 2.5})
  logged["epoch_time"] = [(7, 2.5)]
  assert read_scalars(str(tmp_path)) == logged
  assert [f for f in os.listdir(tmp_path) if "tfevents" in f]


def test_jax_values(tmp_path):
  jnp = pytest.importorskip("jax.numpy")
  with EventWriter(str(tmp_path), process_index=0) as tb:
    tb.scalars(3, {"loss": jnp.float32(0.25), "acc": jnp.array([0.75])})
  assert read_scalars(str(tmp_path)) == {"loss": [(3, 0.25)], "acc": [(3, 0.75)]}


@pytest.mark.parametrize("enabled, process_index", [(False, 0), (True, 1)])
def test_disabled_or_not_process_zero_writes_nothing(tmp_path, enabled, process_index):
  logdir = tmp_path / "tb"
  with EventWriter(str(logdir), enabled=enabled, process_index=process_index) as tb:
    assert not tb.enabled
    assert tb.scalars(1, {"loss": 1.0}) == 0
  assert not logdir.exists()


def test_reader_stops_at_a_truncated_record_and_refuses_a_corrupt_one(tmp_path):
  with EventWriter(str(tmp_path), process_index=0) as tb:
    for step in range(3):
      tb.scalars(step, {"loss": float(step)})
  (path,) = [tmp_path / f for f in os.listdir(tmp_path)]
  blob = path.read_bytes()
  path.write_bytes(blob[:-5])  # a writer still writing its last record
  assert read_scalars(str(tmp_path)) == {"loss": [(0, 0.0), (1, 1.0)]}
  bad = bytearray(blob)
  bad[-6] ^= 1  # inside the last record's data
  path.write_bytes(bytes(bad))
  with pytest.raises(ValueError, match="corrupt record"):
    read_scalars(str(tmp_path))
