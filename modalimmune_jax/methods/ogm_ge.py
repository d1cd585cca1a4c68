"""OGM-GE, On-the-fly Gradient Modulation with Generalization Enhancement (Peng,
Wei et al., CVPR 2022; Wei et al., TPAMI 2024, arXiv 2410.11582): slow down the
dominant modality's encoder, then add Gaussian noise to every encoder's gradient.

Reimplemented from the authors' code, GeWu-Lab/OGM-GE_CVPR2022 ``main.py``
(the same rule in GeWu-Lab/BML_TPAMI2024 ``code/main.py:116-169``). Per batch:

1. **Scores** (:mod:`~modalimmune_jax.methods.balance`): ``score_m`` over the
   global batch from our zeroed-others analogue of the code's concat-head split
   (``main.py:88-93, 105-106``), detached; ``rho_m = score_m / ref_m``
   (``main.py:108-109``: ``ratio_v = score_v / score_a``); with three or more
   modalities ``ref_m`` is the smallest other score by default (``reference =
   "min"``, GeWu-Lab/BalanceBenchmark ``balancemm/trainer/OGM_trainer.py:144-145``,
   where every modality with ``rho_m > 1`` is modulated) or the sum of the others
   (``"sum"``, OPM's rule).
2. **Coefficient** (:func:`coefficients`, ``main.py:119-124``, Eq. 10 of the CVPR
   paper): ``k_m = 1 - tanh(alpha * relu(rho_m))`` when ``rho_m > 1``, else 1.
   The code applies ``relu`` to ``rho`` itself, not to ``rho - 1``, so ``k``
   jumps from 1 to ``1 - tanh(alpha)`` as ``rho`` crosses 1 (``relu`` is the
   identity there).
3. **Modulation** (``main.py:132-148``), for ``modulation_starts <= step <=
   modulation_ends`` (``main.py:132``; epochs there, steps here): each weight
   tensor ``W`` of encoder ``m`` gets ``grad W <- k_m grad W + N(0, std(grad W) +
   1e-8)`` per tensor, elementwise (``main.py:138-139``; ``std`` with Bessel's
   correction, as ``torch.Tensor.std``), in the same step; without ``ge`` (the
   code's ``--modulation OGM``, ``main.py:140-141``) only the scaling. The noise
   is added to every encoder, the dominant one and the others (``k = 1``). The
   code modulates the 4-D tensors (its ResNets' convolution weights, not
   BatchNorm's parameters; BalanceBenchmark every tensor but the 1-D biases);
   ours are the encoders' linear kernels (not biases, LayerNorm parameters or
   the positional table).

How: :func:`modulate_encoders` passes each such kernel through an identity
whose backward pass (``jax.custom_vjp``) maps the kernel's gradient ``g`` to
``k_m g + (std(g) + 1e-8) eps``, ``eps ~ N(0, 1)`` drawn from the step key.
This is the code's rule exactly: the noise's scale is the *unmodulated*
gradient's std (the code evaluates ``parms.grad.std()`` before it assigns),
which an optax transformation in front of the optimiser could not recover once
the gradient was scaled, and the scaling touches the kernels only. Inside
``shard_map`` the kernels are replicated, so the cotangent that reaches the
identity is already the global-batch gradient (``shard_map`` sums the devices'
contributions where the replicated value meets the per-device batch), and the
noise comes from the step key, the same on every device: N devices update as
one (tested on 4 CPU devices).

**Adam**: the maintainers (OGM-GE issue #26) note that Adam's per-coordinate
normalisation largely cancels a scaling of the gradient (``k`` appears in the
numerator and in the second moment); they applied the same rule with Adam and
report a smaller gain than with SGD. Our optimiser is AdamW: a slowly varying
``k`` has little effect beyond the moments' lag and ``epsilon``; what acts is
the change of ``k`` from step to step and the GE noise, whose scale is the
unscaled gradient's, so relative to the dominant encoder's scaled gradient it
is ``1 / k`` times larger. The other encoders see gradient plus noise of equal
std.

The step index the window reads is the method state (``update`` writes the
index of the next step), checkpointed with the train state.

Example:
  >>> method = ogm_ge(model_fns, Settings(alpha=0.8), modulation_ends=100)
"""

from __future__ import annotations

from typing import Annotated, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from modalimmune_jax.methods.balance import REFERENCES, modality_scores, score_ratios
from modalimmune_jax.methods.base import Method, MethodSpec, ModelFns
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.schema import ConfigError, Key

__all__ = ["Settings", "NOISE_FLOOR", "coefficients", "encoder_kernel", "modulated",
           "modulate_encoders", "ogm_ge", "modulation_window", "SPEC"]

NOISE_FLOOR = 1e-8  # main.py:139, `parms.grad.std().item() + 1e-8`


class Settings(NamedTuple):
  """``config.method.ogm_ge`` (sources: GeWu-Lab/OGM-GE_CVPR2022, ``docs/method.md``)."""
  alpha: Annotated[float, Key(
      "code: README, 0.8 for CREMA-D and 0.1 for VGGSound (BML `code/scripts/train_ogm.sh` "
      "0.8); BASELINES.md: 0.1-2.6 by data set", within="[0, inf)")] = 0.8
  ge: Annotated[bool, Key(
      "code: `--modulation OGM_GE`, the default (`main.py:23`); off: `OGM`, the scaling "
      "alone")] = True
  modulation_starts: Annotated[int, Key(
      "code: `--modulation_starts 0` (`main.py:41`, epochs there, steps here)",
      integer=True, within="[0, inf)")] = 0
  modulation_ends: Annotated[int, Key(
      "code: `--modulation_ends 50` of 100 epochs, inclusive (`main.py:42, 132`); in steps, "
      "-1 = half of `train.steps`", integer=True, within="[-1, inf)")] = -1
  reference: Annotated[str, Key(
      "code: BalanceBenchmark `OGM_trainer.py:144-145`, each score against the smallest "
      "other (3+ modalities; 2: the other score); `sum` is OPM's rule",
      choices=REFERENCES)] = "min"


def coefficients(rho: jax.Array, alpha: float) -> jax.Array:
  """``k_m = 1 - tanh(alpha relu(rho_m))`` where ``rho_m > 1``, else 1
  (``main.py:119-124``).

  Example:
    >>> coefficients(jnp.array([1.5, 1 / 1.5]), 0.8)   # [1 - tanh(1.2), 1]
  """
  return jnp.where(rho > 1.0, 1.0 - jnp.tanh(alpha * jax.nn.relu(rho)), 1.0)


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def encoder_kernel(path, names: Sequence[str]) -> int | None:
  """The modality index whose encoder's linear kernel the parameter at pytree
  ``path`` is, or None (other parts, biases, norms, the positional table)."""
  keys = [_key_name(k) for k in path]
  if len(keys) < 3 or keys[0] != "encoders" or keys[1] not in names:
    return None
  keys = [k for k in keys if k not in (".value", "value")]
  return names.index(keys[1]) if keys[-1] == "kernel" else None


@jax.custom_vjp
def modulated(w: jax.Array, coeff: jax.Array, noise: jax.Array, eps: jax.Array) -> jax.Array:
  """``w`` itself; its gradient ``g`` becomes ``coeff g + noise (std(g) + 1e-8) eps``
  (``std`` with Bessel's correction; ``noise`` 0 or 1)."""
  return w


def _modulated_fwd(w, coeff, noise, eps):
  return w, (coeff, noise, eps)


def _modulated_bwd(res, g):
  coeff, noise, eps = res
  std = jnp.std(g, ddof=1) if g.size > 1 else jnp.zeros([], g.dtype)
  grad = coeff.astype(g.dtype) * g + (noise * (std + NOISE_FLOOR)).astype(g.dtype) * eps
  return grad, jnp.zeros_like(coeff), jnp.zeros_like(noise), jnp.zeros_like(eps)


modulated.defvjp(_modulated_fwd, _modulated_bwd)


def modulate_encoders(params, names: Sequence[str], coeffs: jax.Array, noise: jax.Array,
                      key: jax.Array | None = None):
  """``params`` with every encoder kernel passed through :func:`modulated`:
  encoder ``m``'s gradients scaled by ``coeffs[m]``, plus the GE noise when
  ``noise`` (a 0/1 scalar) and ``key`` (None: no noise, nothing drawn).

  Example:
    >>> p = modulate_encoders(params, model_fns.names, jnp.array([0.2, 1.0]), 1.0, key)
    >>> grads = jax.grad(lambda p: loss_of(p))(p)   # encoder 0: 0.2 g + noise
  """
  noise = jnp.asarray(noise, jnp.float32)
  counter = iter(range(1 << 30))

  def one(path, w):
    m = encoder_kernel(path, names)
    if m is None:
      return w
    i = next(counter)
    if key is None:
      eps, scale = jnp.zeros([], w.dtype), jnp.zeros([], jnp.float32)
    else:
      eps, scale = jax.random.normal(jax.random.fold_in(key, i), w.shape, w.dtype), noise
    return modulated(w, jnp.asarray(coeffs[m], jnp.float32), scale, eps)

  return jax.tree_util.tree_map_with_path(one, params)


def ogm_ge(model: ModelFns, s: Settings = Settings(), modulation_ends: int | None = None,
           reconstruction_weight: float = 1.0) -> Method:
  """The OGM-GE method (module docstring). ``modulation_ends`` (the last
  modulated step, inclusive), when given, replaces ``s.modulation_ends``;
  negative: no end (:func:`from_config` resolves ``-1`` to half of
  ``train.steps``). Its state is the index of the step to come.

  Example:
    >>> method = ogm_ge(model_fns, Settings(alpha=0.8, ge=False), modulation_ends=100)
  """
  if s.reference not in REFERENCES:
    raise ValueError(f"reference must be one of {REFERENCES}, got {s.reference!r}")
  if len(model.names) < 2:
    raise ValueError("OGM-GE needs at least two modalities")
  names = model.names
  ends = s.modulation_ends if modulation_ends is None else modulation_ends
  ends = None if ends is None or ends < 0 else int(ends)

  def loss(params, state, batch, rng, axis_name=None):
    k_noise, k_model = jax.random.split(rng)
    scores = modality_scores(model, params, batch, k_model, axis_name)
    rho = score_ratios(scores, s.reference)
    k = coefficients(rho, s.alpha)
    active = modulation_window(state, s.modulation_starts, ends)
    coeffs = jnp.where(active, k, 1.0)
    modulated_params = modulate_encoders(params, names, coeffs, active.astype(jnp.float32),
                                         k_noise if s.ge else None)
    total, metrics, _ = supervised_loss(model, modulated_params, batch, k_model,
                                        reconstruction_weight, axis_name)
    metrics.update({f"score/{n}": scores[j] for j, n in enumerate(names)})
    metrics.update({f"rho/{n}": rho[j] for j, n in enumerate(names)})
    metrics.update({f"coeff/{n}": coeffs[j] for j, n in enumerate(names)})
    metrics["ogm/active"] = active.astype(jnp.float32)
    return total, 0.0, metrics

  def update(state, params, batch, rng, step, axis_name=None):
    return (step + 1).astype(jnp.int32), {}

  return Method("ogm_ge", init=lambda params: jnp.zeros([], jnp.int32), loss=loss,
                update=update)


def modulation_window(step: jax.Array, starts: int, ends: int | None) -> jax.Array:
  """``starts <= step <= ends`` (``main.py:132``; ``ends`` None: no end)."""
  active = step >= starts
  return active if ends is None else active & (step <= ends)


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  if len(model.names) < 2:
    raise ConfigError(f"method 'ogm_ge' needs at least two modalities, the data has "
                      f"{model.names}")
  ends = config.train.steps // 2 if s.modulation_ends < 0 else s.modulation_ends
  return ogm_ge(model, s, ends, config.method.reconstruction_weight)


def _validate(s: Settings) -> None:
  if 0 <= s.modulation_ends < s.modulation_starts:
    raise ConfigError(f"config key 'method.ogm_ge.modulation_ends' ({s.modulation_ends}) is "
                      f"before 'method.ogm_ge.modulation_starts' ({s.modulation_starts})")


SPEC = MethodSpec(
    "ogm_ge", from_config, Settings, validate=_validate, label="reimpl., official code",
    about=("Reimplementation from the authors' code (GeWu-Lab/OGM-GE_CVPR2022 `main.py`);\n"
           "the per-modality scores are our zeroed-others analogue of its concat-head split, "
           "and for\nregression `exp(-|y - yhat_m|)` stands for `softmax[label]` "
           "(`docs/method.md`)."),
    # alpha over the published range (README: 0.1 VGGSound, 0.8 CREMA-D; up to 2.6)
    search=tuple({"method.ogm_ge.alpha": a} for a in (0.1, 0.8, 2.6)),
    ablations={"ogm_ge": {}, "OGM (no GE noise)": {"method.ogm_ge.ge": False}})
