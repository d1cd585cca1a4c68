"""Cross-modal knowledge distillation: the baseline the EBR paper motivates
(Chaudhuri et al., ICML 2025, arXiv 2505.22483). A REIMPLEMENTATION: no code
was released; ``../shared/BASELINES.md`` says "a multimodal teacher distilled
into the student's per-modality encoders (feature MSE)".

* **Teacher**: a second copy of the model (same architecture, its own
  initialisation), trained on the full training batches with the plain
  objective (task + ``mu`` reconstruction) by its own optimiser (the model's
  optimiser with its schedule over the teacher phase) for the first
  ``teacher_steps`` steps of the run, then frozen.
* **Student** (the model the protocol evaluates): the plain objective on its
  batch (after modality dropout at ``dropout_rate``, 0 = off) plus, once the
  teacher is frozen, ``weight`` times the feature MSE between the student's
  per-modality embeddings ``z_m`` and the frozen teacher's (``target =
  "modality"``: the teacher's ``z_m`` of the full batch; ``"fused"``: the
  teacher's fused multimodal representation, for every ``m``), averaged over
  the student's present (sample, modality) cells, the target under
  ``stop_gradient`` (teacher in evaluation mode).

How one command runs both phases (and why so): the teacher's parameters and
optimiser state live in the method state, so they are checkpointed with the
train state and a run interrupted in either phase resumes exactly; ``update``
trains the teacher while ``step < teacher_steps`` (under ``lax.cond``, so it
costs nothing after). The student is not idle during the teacher phase: it
trains on its own objective from step 0, so it gets the same ``train.steps``
and learning-rate schedule as every other method, with the distillation term
for the last ``train.steps - teacher_steps`` steps (a textbook two-stage KD
would train the student from scratch after the teacher; an idle student here
would spend its schedule's warm-up and peak doing nothing). Inside
``shard_map`` the teacher's objective is ``pmean``-ed before differentiation,
as the step does for the model.

Example:
  >>> method = distill(model_fns, teacher_params, teacher_steps=100,
  ...                  optimizer=optax.adamw(1e-3))
"""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from modalimmune_jax import build
from modalimmune_jax.methods.base import Method, MethodSpec, ModelFns, cell_mean
from modalimmune_jax.methods.dropout import drop_modalities
from modalimmune_jax.methods.plain import supervised_loss
from modalimmune_jax.schema import Key, with_overrides

__all__ = ["Settings", "DistillState", "TARGETS", "feature_mse", "teacher_targets", "distill",
           "SPEC"]

TARGETS = ("modality", "fused")


class Settings(NamedTuple):
  """``config.method.distill`` (a reimplementation; sources in ``docs/method.md``)."""
  teacher_fraction: Annotated[float, Key(
      "ours: the teacher's share of `train.steps` (one run, one schedule for both phases)",
      within="(0, 1)")] = 0.5
  weight: Annotated[float, Key(
      "ours: BASELINES.md names the feature MSE, not its weight; tuned a decade either side",
      within="[0, inf)")] = 1.0
  target: Annotated[str, Key(
      "ours: our reading of \"distilled into the student's per-modality encoders\" "
      "(BASELINES.md); `fused` the other reading", choices=TARGETS)] = "modality"
  dropout_rate: Annotated[float, Key(
      "ours: the student trains on the batch as given (distillation alone, not distillation "
      "plus dropout)", within="[0, 1)")] = 0.0


class DistillState(NamedTuple):
  """Attributes:
    teacher: the teacher's parameters (same structure as the model's).
    teacher_opt: its optimiser state.
    distilling: 1.0 once the teacher phase is over (the loss adds the MSE).
  """
  teacher: Any
  teacher_opt: Any
  distilling: jax.Array


def teacher_targets(model: ModelFns, teacher, batch: dict, target: str = "modality"
                    ) -> jax.Array:
  """The frozen teacher's ``(B, M, k)`` targets on the full ``batch`` (evaluation mode)."""
  out = model.apply(jax.lax.stop_gradient(teacher), batch, None, train=False)
  z = out["embeddings"]
  if target == "fused":
    z = jnp.broadcast_to(out["fused"][:, None, :], z.shape)
  return jax.lax.stop_gradient(z)


def feature_mse(student: jax.Array, target: jax.Array, present: jax.Array,
                axis_name: str | None = None) -> jax.Array:
  """Mean over present cells of ``||z_m - t_m||^2 / k``; with ``axis_name``
  (inside ``shard_map``) the denominator is the device mean of the counts, as
  in :func:`~modalimmune_jax.methods.base.reconstruction_loss`."""
  return cell_mean(jnp.mean((student - target) ** 2, -1), present, axis_name)


def distill(model: ModelFns, teacher_params, teacher_steps: int,
            optimizer: optax.GradientTransformation, weight: float = 1.0,
            target: str = "modality", dropout_rate: float = 0.0,
            reconstruction_weight: float = 1.0) -> Method:
  """Cross-modal knowledge distillation (reimplementation).

  Args:
    model: the model as pure functions (student and teacher share the graph).
    teacher_params: the teacher's initial parameters.
    teacher_steps: steps of the teacher phase (the teacher is trained while
      ``step < teacher_steps``; the MSE term is on from then on).
    optimizer: the teacher's optimiser.
    weight, target, dropout_rate, reconstruction_weight: see the module docstring.
  """
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  if teacher_steps < 1:
    raise ValueError(f"teacher_steps must be >= 1, got {teacher_steps}")

  def init(params):
    teacher = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                           teacher_params)
    return DistillState(teacher, optimizer.init(teacher), jnp.zeros([], jnp.float32))

  def loss(params, state, batch, rng, axis_name=None):
    k_mask, k_model = jax.random.split(rng)
    student_batch = batch
    if dropout_rate > 0:
      student_batch = drop_modalities(batch, k_mask, model.names, dropout_rate, axis_name)
    total, metrics, out = supervised_loss(model, params, student_batch, k_model,
                                          reconstruction_weight, axis_name)
    targets = teacher_targets(model, state.teacher, batch, target)
    mse = feature_mse(out["embeddings"], targets, student_batch["presence"], axis_name)
    total = total + weight * state.distilling * mse
    metrics.update(distill_mse=mse, distilling=state.distilling)
    return total, 0.0, metrics

  def update(state, params, batch, rng, step, axis_name=None):
    key = jax.random.fold_in(rng, 1)

    def train_teacher(_):
      def objective(t):
        total, _, _ = supervised_loss(model, t, batch, key, reconstruction_weight, axis_name)
        return total if axis_name is None else jax.lax.pmean(total, axis_name)
      value, grads = jax.value_and_grad(objective)(state.teacher)
      updates, opt = optimizer.update(grads, state.teacher_opt, state.teacher)
      return optax.apply_updates(state.teacher, updates), opt, value

    def frozen(_):
      return state.teacher, state.teacher_opt, jnp.zeros([], jnp.float32)

    teacher, opt, value = jax.lax.cond(step < teacher_steps, train_teacher, frozen, None)
    distilling = (step + 1 >= teacher_steps).astype(jnp.float32)
    return DistillState(teacher, opt, distilling), {"teacher_loss": value}

  return Method("distill", init=init, loss=loss, update=update)


def from_config(d: Settings, config, model: ModelFns, dataset) -> Method:
  steps = config.train.steps
  teacher_steps = max(1, min(steps, round(d.teacher_fraction * steps)))
  # the teacher: the same architecture (distill adds no model parts), its own
  # initialisation, its own schedule
  _, teacher = nnx.split(build.build_model(config, dataset, seed=config.seed + 1))
  optimizer = build.make_optimizer(with_overrides(config, {"train.steps": teacher_steps}))
  return distill(model, teacher, teacher_steps, optimizer, weight=d.weight, target=d.target,
                 dropout_rate=d.dropout_rate,
                 reconstruction_weight=config.method.reconstruction_weight)


SPEC = MethodSpec(
    "distill", from_config, Settings, label="reimpl., cross-modal KD",
    about="Reimplementation, no official code.",
    search=tuple({"method.distill.weight": w} for w in (0.1, 1.0, 10.0)))
