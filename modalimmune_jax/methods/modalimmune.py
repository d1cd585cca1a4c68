"""ModalImmune (arXiv 2602.16197) as a training method; ``docs/method.md`` has the equations.

The objective of a batch, with meta-parameters ``phi = (lambda, kappa, eta, mu)``
and controller intensities ``alpha`` (:mod:`modalimmune_jax.controller`):

    L = task(x') + mu * recon + lambda * sum_m alpha_m * R(z_m; kappa, eta)

* ``R`` is the spectrum-adaptive collapse penalty
  (:func:`modalimmune_jax.spectral.collapse_penalty`) of each modality's
  encoder output over the (global) batch; the ``lambda`` term is the
  *destructive* part whose gradient the curvature mask damps;
* ``x'``: with probability ``p_destroy`` the batch goes through a destructive
  intervention on one modality drawn from ``alpha``: its embedding replaced by
  the collapsed view at ``kappa`` (``intervention="collapse"``), or the
  modality dropped (``"drop"``); or (``"drop_cells"``) every (sample,
  modality) cell is removed with rate ``min(p_destroy * M * alpha_m, 0.95)``,
  at least one modality kept per sample (uniform ``alpha``: modality dropout at
  rate ``p_destroy``; the controller steers it to the modality the model leans on);
* every ``ctrl_every`` steps the controller re-measures the information gains,
  ``IG_m = L(x without m) - L(x)`` (signed), by default on a fixed batch of the
  *valid* split (``ctrl_data="valid"``, :func:`controller_batch`; never the
  test split): on training batches every gain vanishes once the training loss
  is near zero, and the intensities drift back to uniform; held-out data keep
  showing which modality the prediction leans on;
* every ``hyper_every`` steps BHGD takes one optax step on the unconstrained
  meta-parameters (``log lambda``, ``logit kappa``, ``log eta``, ``log mu``)
  along the certified implicit hyper-gradient
  (:func:`modalimmune_jax.hypergrad.neumann_hypergrad`, damped Gauss-Newton):
  inner objective = ``L`` without intervention on a fixed training batch, outer
  = the task loss averaged over fixed missing-modality patterns of a fixed
  validation batch. A step whose hyper-gradient is not certified, diverges, is
  non-finite or whose error bound exceeds ``hyper_rel_tol * ||g||`` is not
  applied and is counted.

Every part has a switch (:class:`Settings`), so each ablation row is one config.

Example:
  >>> settings = Settings(hyper_every=50, p_destroy=0.3)
  >>> method = modalimmune(model_fns, settings, hyper_data=hyper_batches(dataset, 64, ...))
"""

from __future__ import annotations

import math
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from modalimmune_jax import controller as ctrl
from modalimmune_jax import protocol, spectral
from modalimmune_jax.curvature import curvature_mask, refresh_masks
from modalimmune_jax.hypergrad import GaussNewton, neumann_hypergrad
from modalimmune_jax.masking import random_presence, remove_modalities
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, Periodic, all_finite,
                                          global_batch_size, local_rows, reconstruction_loss)
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.schema import Key

__all__ = ["Settings", "ModalImmuneState", "HyperStats", "constrain", "unconstrain",
           "hyper_batches", "controller_batch", "bhgd_objectives", "modalimmune", "SPEC"]

META = ("lambda", "kappa", "eta", "mu")
INTERVENTIONS = ("collapse", "drop", "drop_cells")
DROP_CELLS_MAX = 0.95  # the highest per-cell removal rate of "drop_cells"


class Settings(NamedTuple):
  """Every switch and setting of the method (``config.method.modalimmune``).

  METHOD.md defines the parts and their switches; it gives no values, so every
  number is ours (most are initial values that BHGD then tunes: lambda, kappa,
  eta and mu).
  """
  # collapse regulariser and its initial meta-parameters
  collapse: Annotated[bool, Key(
      "METHOD.md part 1: the collapse regulariser `lambda sum_m alpha_m R(z_m)` (off only "
      "in the ablation)")] = True
  collapse_weight: Annotated[float, Key(
      "ours: the initial lambda under BHGD; the ablation found the regulariser too weak to "
      "collapse anything near 0.1", within="(0, inf)")] = 0.1
  kappa: Annotated[float, Key(
      "ours: the tail starts beyond 90 % of the energy (initial value under BHGD)",
      within="(0, 1)")] = 0.9
  eta: Annotated[float, Key(
      "ours: the tail boundary's softness, 5 % of the energy (initial value under BHGD)",
      within="(0, inf)")] = 0.05
  # destructive interventions
  interventions: Annotated[bool, Key(
      "METHOD.md part 1: destructive interventions")] = True
  p_destroy: Annotated[float, Key(
      "ours: the intervention probability (per batch) or, for `drop_cells`, the mean "
      "per-cell rate", within="[0, 1]")] = 0.3
  intervention: Annotated[str, Key(
      "METHOD.md part 1: \"replaced by a collapsed view, or dropped\"; `drop_cells` ours "
      "(per-cell removal, added when per-batch drops never trained the keep-one patterns)",
      choices=INTERVENTIONS)] = "collapse"
  # information-gain controller (off: uniform intensities)
  controller: Annotated[bool, Key(
      "METHOD.md part 3: the information-gain controller")] = True
  ctrl_every: Annotated[int, Key(
      "ours: `T_ctrl`, every 10 steps for every data set (`common.modalimmune_periods`)",
      within="(0, inf)")] = 10
  ctrl_decay: Annotated[float, Key(
      "ours: EMA of the information gains (about 10 controller updates of memory)",
      within="[0, 1)")] = 0.9
  ctrl_tau: Annotated[float, Key(
      "ours: softmax temperature of the intensities", within="(0, inf)")] = 0.1
  ctrl_explore: Annotated[float, Key(
      "ours: exploration floor, every modality keeps at least 0.1 / M",
      within="[0, 1]")] = 0.1
  ctrl_data: Annotated[str, Key(
      "METHOD.md part 3 measures \"on the batch\"; ours (issue 22): a fixed batch of the "
      "valid split, as BHGD's outer batches, since training-batch gains vanish once the "
      "training loss is near zero (`train`: the step's batch, as before)",
      choices=("valid", "train"))] = "valid"
  ctrl_batch_size: Annotated[int, Key(
      "ours: the fixed held-out controller batch (`ctrl_data` valid), the whole valid split "
      "when smaller", within="(0, inf)", integer=True)] = 256
  # curvature-aware masking of the destructive gradient
  curvature_mask: Annotated[bool, Key(
      "METHOD.md part 4: curvature-aware masking of the destructive update")] = True
  mask_mode: Annotated[str, Key(
      "ours: METHOD.md offers hard and soft masks; hard is its first",
      choices=("hard", "soft"))] = "hard"
  mask_quantile: Annotated[float, Key(
      "ours: the top 10 % curvature coordinates of each leaf are protected",
      within="[0, 1]")] = 0.9
  mask_beta: Annotated[float, Key(
      "ours: the soft mask's `1 / (1 + beta abs(h))` (soft mode only)")] = 1.0
  mask_every: Annotated[int, Key(
      "ours: `T_curv`, as `T_ctrl` (`common.modalimmune_periods`)", within="(0, inf)")] = 10
  mask_samples: Annotated[int, Key(
      "ours: one Rademacher probe per refresh; the EMA averages the probes over refreshes",
      within="(0, inf)")] = 1
  # BHGD
  bhgd: Annotated[bool, Key(
      "METHOD.md part 5: meta-parameters tuned by certified hyper-gradient")] = True
  hyper_every: Annotated[int, Key(
      "ours: about 8-12 hyper-steps per run (`train.steps` 200, 600, 3000; "
      "`common.modalimmune_periods`)", within="(0, inf)")] = 50
  hyper_lr: Annotated[float, Key(
      "ours: Adam on the unconstrained (log, logit) meta-parameters",
      within="(0, inf)")] = 0.05
  hyper_solver: Annotated[str, Key(
      "METHOD.md part 5 (CG needs about sqrt(kappa) products where Neumann needs kappa; "
      "the same certificate)", choices=("cg", "neumann"))] = "cg"
  hyper_terms: Annotated[int, Key(
      "ours: CG steps per solve; with `hyper_tol`, the most it may take (a cap of 20 left "
      "every synthetic hyper-step uncertified within tolerance, hence rejected; they need "
      "28-35 steps, mfeat about 8)",
      within="(0, inf)")] = 100
  hyper_tol: Annotated[float, Key(
      "ours: the solve stops at the first step whose certified bound is within "
      "`hyper_tol * norm(g)` of the hyper-gradient `g` (0: always `hyper_terms` steps); a "
      "fifth of the acceptance threshold `hyper_rel_tol`, so the step it gives is applied "
      "(mfeat after 100 steps: 8 of the 20 steps, bound 3 % of norm(g), the hyper-step "
      "92 ms instead of 155)",
      within="[0, 1)")] = 0.1
  hyper_damping: Annotated[float, Key(
      "ours: delta of `G + delta I`, the certificate's `mu`", within="(0, inf)")] = 0.1
  hyper_rel_tol: Annotated[float, Key(
      "ours: a step is applied only if `error_bound <= 0.5 norm(g)`, which makes it a proven "
      "descent direction (any value below 1 does)", within="(0, inf)")] = 0.5
  hyper_batch_size: Annotated[int, Key(
      "ours: the fixed inner and outer batches; 32 for the pickle data sets, as their "
      "training batch", within="(0, inf)")] = 64
  hyper_removals: Annotated[str, Key(
      "ours: the outer objective's fixed removals (every single modality removed), plus "
      "`full`", choices=tuple(protocol.REMOVALS))] = "drop_one"
  hyper_missing_rates: Annotated[tuple, Key(
      "ours: plus random missing at 0.5 (independent-cell), the middle of the evaluated "
      "rates", each=Key(within="[0, 1)"))] = (0.5,)


class HyperStats(NamedTuple):
  """BHGD bookkeeping (all scalars): counts and the last certificate."""
  applied: jax.Array
  rejected: jax.Array
  num_terms: jax.Array
  error_bound: jax.Array
  grad_norm: jax.Array
  certified: jax.Array
  diverging: jax.Array
  accepted: jax.Array
  before: dict
  after: dict


class ModalImmuneState(NamedTuple):
  """Method state: controller, meta-parameters, their optimiser, BHGD statistics,
  and the fixed hyper-gradient and controller batches (constant; kept so a step
  is a pure function of the state)."""
  controller: ctrl.ControllerState
  phi: dict
  hyper_opt_state: Any
  hyper: HyperStats
  hyper_data: Any
  ctrl_data: Any = ()


def constrain(phi: dict) -> dict:
  """Unconstrained ``phi`` -> ``lambda, eta, mu > 0`` (exp), ``kappa`` in (0, 1)."""
  return {"lambda": jnp.exp(phi["log_lambda"]), "kappa": jax.nn.sigmoid(phi["logit_kappa"]),
          "eta": jnp.exp(phi["log_eta"]), "mu": jnp.exp(phi["log_mu"])}


def unconstrain(lam: float, kappa: float, eta: float, mu: float) -> dict:
  f = lambda v: jnp.asarray(v, jnp.float32)
  return {"log_lambda": f(math.log(lam)), "logit_kappa": f(math.log(kappa / (1 - kappa))),
          "log_eta": f(math.log(eta)), "log_mu": f(math.log(mu))}


def hyper_batches(dataset, size: int, seed: int, removals: str = "drop_one",
                  missing_rates=(0.5,)) -> tuple[dict, dict]:
  """The fixed BHGD batches: ``size`` training samples, and ``size`` validation
  samples under each missing-modality pattern (``full``, the ``removals`` of
  :data:`modalimmune_jax.protocol.REMOVALS`, random missing at each rate),
  stacked along a leading pattern axis. Drawn once from ``seed``; the
  patterns are the protocol's own conditions, applied with its seeds.
  """
  rng = np.random.default_rng([seed, 7])
  train, valid = dataset.splits["train"], dataset.splits["valid"]
  tr = train.batch(rng.choice(train.num_samples, min(size, train.num_samples), replace=False))
  sub = valid.take(rng.choice(valid.num_samples, min(size, valid.num_samples), replace=False))
  conditions = protocol.standard_conditions(dataset.modality_names, missing_rates,
                                           frame_rates=(), snrs_db=(), removals=removals)
  batches = []
  for cond in conditions:
    degraded, presence = cond.apply(sub, seed)
    b = degraded.batch(np.arange(sub.num_samples))
    b["presence"] = presence
    batches.append(b)
  val = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  drop_index = lambda b: {k: v for k, v in b.items() if k != "index"}
  return drop_index(tr), drop_index(val)


def controller_batch(dataset, size: int, seed: int) -> dict:
  """The controller's fixed held-out batch: ``size`` samples of the valid split
  (all of it when smaller), every modality present, drawn once from ``seed``.

  Example:
    >>> b = controller_batch(dataset, 256, seed=0)  # b["presence"].shape == (256, M)
  """
  valid = dataset.splits["valid"]
  rng = np.random.default_rng([seed, 11])
  rows = rng.choice(valid.num_samples, min(size, valid.num_samples), replace=False)
  return {k: v for k, v in valid.batch(np.sort(rows)).items() if k != "index"}


def _intervention_hook(mode, destroy, target, kappa, axis_name, keep=None):
  """``(z, present) -> (z, present)`` applying the intervention when ``destroy``
  (``"drop_cells"``: the local rows ``keep`` of a per-cell presence draw)."""
  def hook(z, present):
    if mode == "drop_cells":
      return z, present & keep
    if mode == "collapse":  # the view's eigendecomposition only when it is used
      zj = jnp.take(z, target, axis=1)
      kappa_ = jax.lax.stop_gradient(kappa)
      view = jax.lax.cond(destroy,
                          lambda x: spectral.collapsed_view(x, kappa_, axis_name=axis_name),
                          lambda x: x, zj)
      return z.at[:, target].set(view), present
    column = jnp.arange(z.shape[1]) == target
    return z, present & ~(destroy & column)[None, :]
  return hook


def bhgd_objectives(model: ModelFns, settings: Settings) -> tuple[GaussNewton, Any]:
  """BHGD's ``(inner, outer)`` objectives for :func:`~modalimmune_jax.hypergrad.neumann_hypergrad`.

  ``inner(params, phi, train_batch, alpha)``: the training objective without
  intervention, in evaluation mode, split for Gauss-Newton (outputs: logits,
  masked reconstruction residuals, each modality's energy shares; the loss is
  convex in the first two and linear in the shares, and only it reads ``phi``).
  ``outer(params, phi, val_batches)``: the task loss averaged over the stacked
  missing-modality patterns of :func:`hyper_batches`.
  """
  s, m = settings, len(model.names)

  def model_fn(params, phi, batch, alpha):
    out = model.apply(params, batch, None, train=False)
    if "reconstructions" in out:
      w = batch["presence"].astype(out["embeddings"].dtype)[..., None]
      resid = (out["reconstructions"] - jax.lax.stop_gradient(out["embeddings"])) * w
    else:
      resid = jnp.zeros((1,), out["outputs"].dtype)
    shares = jnp.stack([spectral.energy_shares(out["embeddings"][:, j]) for j in range(m)])
    return out["outputs"], resid, shares

  def output_loss(outputs, phi, batch, alpha):
    logits, resid, shares = outputs
    meta = constrain(phi)
    k = resid.shape[-1]
    count = jnp.maximum(jnp.sum(batch["presence"].astype(resid.dtype)), 1.0) * k
    loss = model.task_loss(logits, batch["labels"]) + meta["mu"] * jnp.sum(resid ** 2) / count
    if s.collapse:  # linear in the shares: a zero Gauss-Newton block
      loss += meta["lambda"] * sum(alpha[j] * spectral.tail_energy(shares[j], meta["kappa"],
                                                                   meta["eta"])
                                   for j in range(m))
    return loss

  def outer(params, phi, val):
    per_pattern = jax.vmap(lambda b: model.task_loss(
        model.apply(params, b, None, train=False)["outputs"], b["labels"]))(val)
    return jnp.mean(per_pattern)

  return GaussNewton(model_fn, output_loss, model_uses_hparams=False), outer


def modalimmune(model: ModelFns, settings: Settings = Settings(),
                hyper_data: tuple[dict, dict] | None = None,
                reconstruction_weight: float = 1.0, seed: int = 0,
                ctrl_data: dict | None = None) -> Method:
  """The ModalImmune training method.

  Args:
    model: the model as pure functions.
    settings: switches and settings (:class:`Settings`).
    hyper_data: ``(train_batch, stacked_valid_batches)`` from
      :func:`hyper_batches`; needed when ``settings.bhgd``.
    reconstruction_weight: the initial ``mu`` (the generator's loss weight).
    seed: the curvature mask's probe seed.
    ctrl_data: the controller's fixed held-out batch (:func:`controller_batch`);
      needed when ``settings.controller`` and ``settings.ctrl_data == "valid"``.

  Returns:
    A :class:`~modalimmune_jax.methods.base.Method`.
  """
  s = settings
  if s.intervention not in INTERVENTIONS:
    raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {s.intervention!r}")
  if s.bhgd and hyper_data is None:
    raise ValueError("bhgd needs hyper_data (see hyper_batches)")
  held_out = s.controller and s.ctrl_data == "valid"
  if held_out and ctrl_data is None:
    raise ValueError("ctrl_data='valid' needs the controller batch (see controller_batch)")
  names, m = model.names, len(model.names)
  hyper_opt = optax.adam(s.hyper_lr)
  phi0 = unconstrain(s.collapse_weight, s.kappa, s.eta, reconstruction_weight)

  def alpha_of(state):
    return (state.controller.alpha if s.controller
            else jnp.full((m,), 1.0 / m, jnp.float32))

  def penalties(z, kappa, eta, axis_name=None):
    return jnp.stack([spectral.collapse_penalty(z[:, j], kappa, eta, axis_name=axis_name)
                      for j in range(m)])

  def init(params):
    zero = jnp.zeros([], jnp.float32)
    meta = {k: zero for k in META}
    stats = HyperStats(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                       jnp.zeros([], jnp.int32), zero, zero, jnp.zeros([], bool),
                       jnp.zeros([], bool), jnp.zeros([], bool), meta, meta)
    data = jax.tree.map(jnp.asarray, hyper_data) if s.bhgd else ()
    held = jax.tree.map(jnp.asarray, ctrl_data) if held_out else ()
    return ModalImmuneState(ctrl.init(m), phi0, hyper_opt.init(phi0), stats, data, held)

  def loss(params, state, batch, rng, axis_name=None):
    meta = constrain(state.phi)
    alpha = alpha_of(state)
    k_do, k_pick, k_model = jax.random.split(rng, 3)
    hook = None
    destroy = jnp.zeros([], bool)
    target = jnp.zeros([], jnp.int32)
    keep = None
    if s.intervention == "drop_cells" and s.interventions:
      # per (sample, modality): removed with rate p_destroy * M * alpha_m (capped),
      # drawn for the global batch, at least one modality kept per sample
      rates = jnp.minimum(s.p_destroy * m * alpha, DROP_CELLS_MAX)
      keep = local_rows(random_presence(jax.random.fold_in(k_pick, 1),
                                        global_batch_size(batch, axis_name), rates), axis_name)
    if s.interventions and s.intervention != "drop_cells":
      # the same draw on every device: one decision per global batch
      destroy = jax.random.uniform(k_do) < s.p_destroy
      target = jax.random.categorical(k_pick, jnp.log(alpha))
    if s.interventions:
      hook = _intervention_hook(s.intervention, destroy, target, meta["kappa"], axis_name,
                                keep)
    out = model.apply(params, batch, k_model, hook=hook, axis_name=axis_name)
    task = model.task_loss(out["outputs"], batch["labels"])
    recon = reconstruction_loss(out, batch["presence"], axis_name)
    metrics = {"task_loss": task, "recon_loss": recon,
               "kept_fraction": jnp.mean(out["presence"].astype(jnp.float32)),
               "destroyed": destroy.astype(jnp.float32),
               "target": jnp.where(destroy, target, -1).astype(jnp.float32)}
    destructive = jnp.zeros([], task.dtype)
    if s.collapse:
      r = penalties(out["embeddings"], meta["kappa"], meta["eta"], axis_name)
      destructive = meta["lambda"] * jnp.sum(alpha * r)
      metrics.update({f"collapse/{n}": r[j] for j, n in enumerate(names)})
    metrics["destructive"] = destructive
    return task + meta["mu"] * recon + destructive, destructive, metrics

  def destructive(params, state, batch, rng, axis_name=None):
    """The collapse term alone: it reads the encoders' outputs (before any
    intervention, with the loss's dropout key), so its gradient needs only
    their backward pass (``model.embed``: the fusion and head are not traced)."""
    meta = constrain(state.phi)
    k_model = jax.random.split(rng, 3)[2]
    z = model.embed(params, batch, k_model, axis_name=axis_name)
    return meta["lambda"] * jnp.sum(alpha_of(state) * penalties(z, meta["kappa"], meta["eta"],
                                                                axis_name))

  # the solves and their certificates in float32, whatever the model trains in
  inner, outer = bhgd_objectives(model.in_float32(), s)

  def hyper_step(state, params):
    train_b, val = state.hyper_data
    alpha = jax.lax.stop_gradient(alpha_of(state))
    terms = (dict(rel_tol=s.hyper_tol, max_terms=s.hyper_terms) if s.hyper_tol
             else dict(num_terms=s.hyper_terms))
    g, cert = neumann_hypergrad(inner, outer, params, state.phi,
                                inner_args=(train_b, alpha), outer_args=(val,),
                                solver=s.hyper_solver, damping=s.hyper_damping, **terms)
    g_norm = otu.tree_norm(g)
    # a rigorous, finite bound within hyper_rel_tol of |g| (a solve that stopped at
    # its cap before hyper_tol may still pass: cert.certified would also ask hyper_tol)
    accept = (cert.rigorous & ~cert.diverging & jnp.isfinite(g_norm)
              & jnp.isfinite(cert.error_bound) & (cert.error_bound <= s.hyper_rel_tol * g_norm))
    updates, opt_state = hyper_opt.update(g, state.hyper_opt_state, state.phi)
    new_phi = optax.apply_updates(state.phi, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accept, a, b), new, old)
    phi = keep(new_phi, state.phi)
    h = state.hyper
    stats = HyperStats(h.applied + accept, h.rejected + (~accept), cert.num_terms,
                       cert.error_bound, g_norm, cert.certified, cert.diverging, accept,
                       constrain(state.phi), constrain(phi))
    return state._replace(phi=phi, hyper_opt_state=keep(opt_state, state.hyper_opt_state),
                          hyper=stats)

  def state_metrics(state):
    """The meta-parameters, intensities, information gains and BHGD's counts
    and last certificate, as the step logs them."""
    meta = constrain(state.phi)
    alpha = alpha_of(state)
    metrics = {f"meta/{k}": v for k, v in meta.items()}
    metrics.update({f"alpha/{n}": alpha[j] for j, n in enumerate(names)})
    metrics.update({f"ig/{n}": state.controller.ig[j] for j, n in enumerate(names)})
    h = state.hyper
    metrics.update({"hyper/applied": h.applied, "hyper/rejected": h.rejected,
                    "hyper/num_terms": h.num_terms, "hyper/error_bound": h.error_bound,
                    "hyper/grad_norm": h.grad_norm, "hyper/certified": h.certified,
                    "hyper/diverging": h.diverging, "hyper/accepted": h.accepted,
                    **{f"hyper/before/{k}": v for k, v in h.before.items()},
                    **{f"hyper/after/{k}": v for k, v in h.after.items()}})
    return metrics

  def update(state, params, batch, rng, step, axis_name=None):
    """Every step: the state's metrics (the periodic work is in ``periodic``)."""
    return state, state_metrics(state)

  # The periodic parts, each its own program around the step it fires at
  # (Method.periodic): the curvature refresh before the step, on the parameters
  # and batch the step starts from; the controller and the hyper-step after it.
  def refresh(params, opt_state, state, batch, rng, step, axis_name=None):
    def objective(p):
      value = clean_objective(p, state, batch, rng, axis_name)
      return value if axis_name is None else jax.lax.pmean(value, axis_name)
    return refresh_masks(opt_state, params, objective, **mask_settings), state, {}

  def measure(params, opt_state, state, batch, rng, step, axis_name=None):
    # held out: every device holds the whole fixed batch (as BHGD's), so the gains
    # are already the global batch's and equal on every device
    data = state.ctrl_data if held_out else batch

    def losses_of(rows):
      # The encoders run once: a removed modality's embedding never reaches the
      # fusion (its token is the fill, and the generator's context leaves it
      # out), so removing it is switching its presence off after the encoders.
      # The hook repeats the embeddings once per row, with the row's presence;
      # equal to removing each modality from the inputs (tests/test_modalimmune_train.py).
      def per_row(z, present):
        r = rows.shape[0]
        return (jnp.broadcast_to(z[None], (r, *z.shape)).reshape(-1, *z.shape[1:]),
                (present[None] & rows[:, None, :]).reshape(-1, m))
      out = model.apply(params, data, None, train=False, hook=per_row)["outputs"]
      out = out.reshape(rows.shape[0], -1, *out.shape[1:])
      return jax.vmap(model.task_loss, in_axes=(0, None))(out, data["labels"])
    ig = ctrl.information_gain(losses_of, m, batched=True)
    c = ctrl.update(state.controller, ig, decay=s.ctrl_decay, tau=s.ctrl_tau,
                    explore=s.ctrl_explore, axis_name=None if held_out else axis_name)
    state = state._replace(controller=c)
    return opt_state, state, state_metrics(state)

  def bhgd(params, opt_state, state, batch, rng, step, axis_name=None):
    state = hyper_step(state, params)
    return opt_state, state, state_metrics(state)

  def events(step_done, get_metrics):
    """A ``hypergrad`` record after each hyper-step (``step_done`` = steps taken)."""
    if not s.bhgd or step_done % s.hyper_every:
      return []
    mt = get_metrics()
    rec = {"event": "hypergrad", "step": step_done,
           "before": {k: float(mt[f"hyper/before/{k}"]) for k in META},
           "after": {k: float(mt[f"hyper/after/{k}"]) for k in META},
           "num_terms": int(mt["hyper/num_terms"]), "error_bound": float(mt["hyper/error_bound"]),
           "grad_norm": float(mt["hyper/grad_norm"]), "certified": bool(mt["hyper/certified"]),
           "diverging": bool(mt["hyper/diverging"]), "applied": bool(mt["hyper/accepted"]),
           "applied_total": int(mt["hyper/applied"]), "rejected_total": int(mt["hyper/rejected"])}
    return [rec]

  def clean_objective(params, state, batch, rng, axis_name=None):
    """What the curvature mask protects: the supervised loss without intervention."""
    return supervised_loss(model, params, batch, None, constrain(state.phi)["mu"],
                           axis_name)[0]

  def faults(old, new):
    """Non-finite statistics of this step's update (the step then applies nothing)."""
    return {"controller information gain": ~jnp.all(jnp.isfinite(new.controller.ig)),
            "hyper-gradient": ~jnp.isfinite(new.hyper.grad_norm),
            "meta-parameters": ~all_finite((new.phi, new.hyper_opt_state))}

  transforms, periodic = (), []
  # only the destructive part is masked, and it reaches the encoders alone: the
  # curvature of the other leaves would be estimated and never read
  mask_settings = dict(mode=s.mask_mode, quantile=s.mask_quantile, beta=s.mask_beta,
                       num_samples=s.mask_samples,
                       mask=model.encoder_leaves if s.collapse else None)
  if s.curvature_mask:  # refreshed by its own program (refresh_every=0)
    transforms = (curvature_mask(refresh_every=0, seed=seed, **mask_settings),)
    periodic.append(Periodic(s.mask_every, refresh, before=True))
  if s.controller:
    periodic.append(Periodic(s.ctrl_every, measure))
  if s.bhgd:  # after the last step of each period of hyper_every steps
    periodic.append(Periodic(s.hyper_every, bhgd, phase=s.hyper_every - 1))
  return Method("modalimmune", init=init, loss=loss, update=update, transforms=transforms,
                split_destructive=s.curvature_mask and s.collapse, events=events,
                objective=clean_objective, faults=faults, periodic=tuple(periodic),
                destructive=destructive)


def from_config(s: Settings, config, model: ModelFns, dataset) -> Method:
  data = (hyper_batches(dataset, s.hyper_batch_size, config.seed, s.hyper_removals,
                        s.hyper_missing_rates) if s.bhgd else None)
  held = (controller_batch(dataset, s.ctrl_batch_size, config.seed)
          if s.controller and s.ctrl_data == "valid" else None)
  return modalimmune(model, s, data, config.method.reconstruction_weight, config.seed, held)


SPEC = MethodSpec(
    "modalimmune", from_config, Settings,
    about="METHOD.md defines the parts and their switches; it gives no values, so every "
          "number\nis ours (most are initial values that BHGD then tunes: lambda, kappa, eta "
          "and mu).\nWhat the parts do with them is in `experiments/README.md` (ablation, "
          "training\ndynamics).",
    # the intervention (kind and probability); its loss weights are tuned by BHGD
    search=({"method.modalimmune.intervention": "drop", "method.modalimmune.p_destroy": 0.6},
            {"method.modalimmune.intervention": "drop_cells",
             "method.modalimmune.p_destroy": 0.3},
            {"method.modalimmune.intervention": "drop_cells",
             "method.modalimmune.p_destroy": 0.5}),
    # each row switches one part off (a row is one config)
    ablations={
        "modalimmune": {},
        "no controller (uniform alpha)": {"method.modalimmune.controller": False},
        "no collapse regulariser": {"method.modalimmune.collapse": False},
        "no interventions": {"method.modalimmune.interventions": False},
        "no curvature mask": {"method.modalimmune.curvature_mask": False},
        "no BHGD (fixed meta-parameters)": {"method.modalimmune.bhgd": False},
        "no reconstruction generator": {"model.reconstruction": False},
        "no property vectors": {"model.property_vectors": False},
    })
