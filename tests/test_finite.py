"""``finite.all_finite``: one reduction per dtype, against numpy leaf by leaf."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from modalimmune_jax.finite import all_finite, has_floats

DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.int32)
SPECIALS = (0.0, 1.0, -2.5, np.inf, -np.inf, np.nan)


@st.composite
def trees(draw):
  leaves = []
  for _ in range(draw(st.integers(0, 4))):
    dtype = draw(st.sampled_from(DTYPES))
    size = draw(st.integers(0, 5))
    if dtype == np.int32:
      leaves.append(np.arange(size, dtype=dtype))
    else:
      leaves.append(np.asarray(draw(st.lists(st.sampled_from(SPECIALS), min_size=size,
                                             max_size=size)), dtype=dtype))
  return {f"leaf{i}": x for i, x in enumerate(leaves)}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(trees())
def test_all_finite_matches_numpy_leaf_by_leaf(tree):
  expected = all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in tree.values())
  assert bool(all_finite(jax_tree := {k: jnp.asarray(v) for k, v in tree.items()})) == expected
  assert has_floats(jax_tree) == any(v.dtype != np.int32 for v in tree.values())


def test_all_finite_does_not_cast_large_values():
  # near each dtype's largest finite value: a cast to a common narrower dtype (float16)
  # would turn the float32 and bfloat16 leaves into inf; per dtype, nothing is cast
  tree = (jnp.array([65504.0], jnp.float16), jnp.array([3.0e38], jnp.float32),
          jnp.array([3.0e38], jnp.bfloat16))
  assert bool(all_finite(tree))
  assert not bool(all_finite(tree + (jnp.array([jnp.nan], jnp.float16),)))
