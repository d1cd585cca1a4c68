"""Command line: ``python -m modalimmune_jax.main --config=CONFIG --workdir=DIR``.

    python -m modalimmune_jax.main --config=experiments/configs/mfeat.py --workdir=runs/mfeat
    python -m modalimmune_jax.main --config=experiments/configs/mfeat.py:smoke \\
        --workdir=runs/smoke --config.train.steps=200

Overrides use ml-collections syntax (``--config.KEY=VALUE``); an unknown key is
an error. A run resumes from the newest good checkpoint in ``--workdir``; a
work directory made with another config is refused (``--fresh`` moves it
aside, ``--extend`` trains on to more steps). User errors are one line on
stderr with exit code 2 (``--debug`` shows the traceback); SIGTERM / SIGINT
save a checkpoint first. XLA's compilation cache is on (``--compile_cache``).
``--config.train.seeds=(0,1,2)`` trains those seeds as one vmapped program,
each in ``WORKDIR/seed<k>/`` (:func:`modalimmune_jax.train.train_seeds`).
With ``config.distributed.enabled`` the run joins JAX's distributed runtime
first.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (:func:`run`), not on import (as
  ``compare`` and ``tune`` do: importing this module beside them defines nothing)."""
  if "fresh" in FLAGS:  # defined already (run() called twice in one process)
    return
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file (path[:variant]).",
                                  lock_config=True)
  flags.DEFINE_bool("fresh", False, "If --workdir holds a run of another config, move it "
                    "aside (WORKDIR.old-TIME) and start again.")
  flags.DEFINE_bool("extend", False, "Train the run in --workdir on to a larger train.steps.")
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
  from modalimmune_jax import cli
  cli.quiet_logging()
  from modalimmune_jax.config import validate_config
  config = FLAGS.config
  validate_config(config)
  if FLAGS.fresh and FLAGS.extend:
    raise cli.FlagError("--fresh and --extend exclude each other")
  initialize_distributed(config)
  cli.enable_compile_cache()
  import jax
  from modalimmune_jax import train
  on_change = "fresh" if FLAGS.fresh else "extend" if FLAGS.extend else "refuse"
  seeds = list(config.train.seeds)
  if seeds:  # several seeds in one vmapped program, WORKDIR/seed<k> each
    workdirs = [f"{FLAGS.workdir}/seed{s}" for s in seeds]
    summaries = train.train_seeds(config, seeds, workdirs, on_change=on_change)
  else:
    workdirs = [FLAGS.workdir]
    summaries = [train.train_and_evaluate(config, FLAGS.workdir, on_change=on_change)]
  if jax.process_index() == 0:
    for summary, workdir in zip(summaries, workdirs):
      if summary["start_step"]:
        print(f"resumed from step {summary['start_step']} (checkpoint in {workdir})")
      if summary["stopped"]:
        print(f"stopped after step {config.train.stop_after}; rerun to resume")
        continue
      print()
      print(open(f"{workdir}/results.md").read())
    summary = summaries[0]
    if not summary["stopped"]:
      t = summary["train_seconds"]
      together = f" ({len(seeds)} seeds in one program)" if len(summaries) > 1 else ""
      print(f"trained {summary['steps'] - summary['start_step']} steps{together} in {t:.1f} s "
            f"(first step {summary['first_step_seconds'] or 0:.1f} s); results in "
            + ", ".join(f"{w}/results.md" for w in workdirs) + " and results.json")
  return 0


def run() -> None:
  """Console-script entry point (``modalimmune-train``)."""
  from modalimmune_jax import cli
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
