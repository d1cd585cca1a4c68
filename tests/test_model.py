import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modalimmune_jax import data
from modalimmune_jax.model import MultimodalModel

SHAPES = {"text": (6, 5), "audio": (4, 3), "vision": (1, 2)}


def _batch(n=5, seed=0):
  ds = data.make_synthetic((n, 2, 2), shapes=SHAPES, variable_length=True, seed=seed)
  return ds.splits["train"].batch(np.arange(n))


@pytest.mark.parametrize("task,num,shape", [("regression", 1, (5,)),
                                            ("classification", 3, (5, 3)),
                                            ("multilabel", 4, (5, 4, 2))])
def test_output_shapes(task, num, shape):
  model = MultimodalModel(SHAPES, task, num, hidden=8, num_heads=2, rngs=nnx.Rngs(0))
  b = _batch()
  out = model(b["inputs"], b["masks"], b["presence"])
  assert out["outputs"].shape == shape
  assert out["embeddings"].shape == (5, 3, 8)
  assert out["fused"].shape == (5, 8)


@pytest.mark.parametrize("prop,recon", [(False, False), (True, False), (False, True),
                                        (True, True)])
def test_missing_modality_input_is_ignored(prop, recon):
  """Whatever sits in a missing modality's arrays cannot change the prediction."""
  model = MultimodalModel(SHAPES, "classification", 3, hidden=8, num_heads=2,
                          property_vectors=prop, reconstruction=recon, rngs=nnx.Rngs(1))
  b = _batch()
  presence = np.ones((5, 3), bool)
  presence[:, 1] = False
  presence[0, 0] = False
  out1 = model(b["inputs"], b["masks"], presence)["outputs"]
  garbage = dict(b["inputs"], audio=np.full_like(b["inputs"]["audio"], 7.0))
  garbage["text"] = garbage["text"].copy()
  garbage["text"][0] = -3.0
  out2 = model(garbage, b["masks"], presence)["outputs"]
  np.testing.assert_allclose(out1, out2, atol=1e-5)
  full = model(b["inputs"], b["masks"], np.ones((5, 3), bool))["outputs"]
  assert not np.allclose(full, out1)
  if recon:
    assert model(b["inputs"], b["masks"], presence)["reconstructions"].shape == (5, 3, 8)


def test_padding_frames_are_ignored():
  model = MultimodalModel(SHAPES, "regression", 1, hidden=8, num_heads=2, rngs=nnx.Rngs(2))
  b = _batch()
  out1 = model(b["inputs"], b["masks"], b["presence"])["outputs"]
  noisy = {m: np.where(b["masks"][m][..., None], x, 5.0) for m, x in b["inputs"].items()}
  out2 = model(noisy, b["masks"], b["presence"])["outputs"]
  np.testing.assert_allclose(out1, out2, atol=1e-5)


def test_embedding_hook_and_split_merge_roundtrip():
  model = MultimodalModel(SHAPES, "classification", 3, hidden=8, num_heads=2, rngs=nnx.Rngs(3))
  b = _batch()
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, batch):
    m = nnx.merge(graphdef, state)
    hook = lambda z, p: (jnp.zeros_like(z), p)
    return (m(batch["inputs"], batch["masks"], batch["presence"])["outputs"],
            m(batch["inputs"], batch["masks"], batch["presence"], embedding_hook=hook)["outputs"])

  plain, hooked = apply(state, b)
  np.testing.assert_allclose(plain, model(b["inputs"], b["masks"], b["presence"])["outputs"],
                             atol=1e-5)
  assert not np.allclose(plain, hooked)
  with pytest.raises(KeyError, match="lacks modalities"):
    model({"text": b["inputs"]["text"]}, b["masks"], b["presence"])
