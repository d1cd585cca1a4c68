"""Training and evaluation: setup from a config, the loop, the results.

The model is split once into ``(graphdef, params)`` and wrapped as
:class:`~modalimmune_jax.methods.base.ModelFns`; the method that
``config.method.name`` names (:mod:`modalimmune_jax.methods`) supplies the
loss, its state and its periodic update; :mod:`modalimmune_jax.step` turns
them into the pure, data-parallel step over one
:class:`~modalimmune_jax.step.TrainState`; :mod:`modalimmune_jax.checkpoint`
saves that state in one piece. One module per concern:

* :mod:`~modalimmune_jax.train.assemble`: data, model, method, optimiser, mesh,
  state and step from a config (:func:`setup`);
* :mod:`~modalimmune_jax.train.loop`: the loop, one screen, and how its steps
  run (one run or seeds in one vmapped program; device or host batches);
* :mod:`~modalimmune_jax.train.run`: one run's checkpoints, log and resume;
* :mod:`~modalimmune_jax.train.workdir`: the work directory's config check,
  the errors a run stops with, SIGTERM / SIGINT;
* :mod:`~modalimmune_jax.train.evaluation`: the protocol's conditions,
  validation and model selection on the valid split;
* :mod:`~modalimmune_jax.train.report`: the final evaluation and result files;
* :mod:`~modalimmune_jax.train.seeds`: the entry points,
  :func:`train_and_evaluate` and :func:`train_seeds`.

Example:
  >>> summary = train_and_evaluate(config, "runs/mfeat")     # checkpoints, resume, results
  >>> run = setup(config)                                    # the pieces, for your own loop
"""

from modalimmune_jax.build import load_data, make_optimizer
from modalimmune_jax.train.evaluation import eval_conditions, evaluate_split
from modalimmune_jax.train.report import render_results
from modalimmune_jax.train.seeds import (finished, run_once, run_seeds, train_and_evaluate,
                                         train_seeds)
from modalimmune_jax.train.assemble import Batches, Setup, build_model, make_predict_fn, setup
from modalimmune_jax.train.workdir import (Interrupted, NonFiniteError, WorkdirError,
                                           check_workdir)

__all__ = [
    "NonFiniteError", "WorkdirError", "Interrupted", "load_data", "check_workdir",
    "build_model", "make_optimizer", "make_predict_fn", "Batches", "Setup", "setup",
    "train_and_evaluate", "train_seeds", "finished", "run_once", "run_seeds",
    "eval_conditions", "evaluate_split", "render_results",
]
