"""Command line: ``python -m modalimmune_jax.main --config=CONFIG --workdir=DIR``.

    python -m modalimmune_jax.main --config=experiments/configs/mfeat.py --workdir=runs/mfeat
    python -m modalimmune_jax.main --config=experiments/configs/mfeat.py:smoke \\
        --workdir=runs/smoke --config.train.steps=200

Overrides use ml-collections syntax (``--config.KEY=VALUE``); an unknown key is
an error. A run resumes from the newest good checkpoint in ``--workdir``. With
``config.distributed.enabled`` the run joins JAX's distributed runtime first.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file (path[:variant]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(config) -> None:
  """Joins ``jax.distributed`` as ``config.distributed`` says (before any JAX work)."""
  import jax
  d = config.distributed
  if not d.enabled:
    return
  if d.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address,
                  num_processes=d.num_processes, process_id=d.process_id)
  jax.distributed.initialize(**kwargs)


def main(argv) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" noise
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
  from modalimmune_jax.config import ConfigError, validate_config
  config = FLAGS.config
  try:
    validate_config(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  initialize_distributed(config)
  import jax
  from modalimmune_jax import train
  summary = train.train_and_evaluate(config, FLAGS.workdir)
  if jax.process_index() == 0:
    if summary["stopped"]:
      print(f"stopped after step {config.train.stop_after}; rerun to resume")
    else:
      print()
      print(open(f"{FLAGS.workdir}/results.md").read())
      t = summary["train_seconds"]
      print(f"trained {summary['steps'] - summary['start_step']} steps in {t:.1f} s; "
            f"results in {FLAGS.workdir}/results.md and results.json")
  return 0


def run() -> None:
  """Console-script entry point (``modalimmune-train``)."""
  app.run(main)


if __name__ == "__main__":
  run()
