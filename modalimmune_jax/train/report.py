"""A finished run's evaluation and result files: the protocol on ``eval.split``,
``results.json`` / ``results.md`` / ``results.png`` with their provenance."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from modalimmune_jax import protocol
from modalimmune_jax.metrics import HEADLINE
from modalimmune_jax.plots import plot_protocol
from modalimmune_jax.provenance import markdown_lines, provenance
from modalimmune_jax.step import device_batch, host_copy
from modalimmune_jax.tensorboard import EventWriter
from modalimmune_jax.train.evaluation import eval_conditions, evaluate_split
from modalimmune_jax.train.run import Run

__all__ = ["finish", "render_results"]


def finish(run: Run, state, predict, *, stopped: bool, train_seconds: float,
           first_step_seconds: float | None, seeds_together: Sequence[int]) -> dict:
  """The run's summary; unless stopped early, the protocol on ``eval.split``
  and the result files."""
  config, dataset, method = run.config, run.dataset, run.method
  summary: dict[str, Any] = {
      "method": method.name, "dataset": dataset.name, "task": dataset.task,
      "steps": config.train.steps, "start_step": run.start, "stopped": stopped,
      "nonfinite_skipped": int(state.health.skipped), "devices": run.setup.mesh.devices.size,
      "processes": jax.process_count(), "first_step_seconds": first_step_seconds,
      "train_seconds": train_seconds,
      "train_seconds_total": run.seconds_before + train_seconds,
      "config": json.loads(config.to_json_best_effort()),
  }
  if len(seeds_together) > 1:  # one vmapped program: its time is all seeds' time
    summary["seeds_together"] = list(seeds_together)
  final_state = host_copy(state)
  summary["final_params"] = final_params = final_state.params
  summary["final_state"] = final_state
  if stopped:
    return summary
  final_method_state = run.eval_state(final_state)
  if run.selector is not None:  # one checkpoint for every metric: the one chosen on valid
    summary["selection"] = run.selector.summary()
    final_params = run.selector.best_params
    final_method_state = run.selector.best_method_state
  result = protocol.evaluate(
      lambda b: predict(final_params, device_batch(b), final_method_state),
      dataset.splits[config.eval.split], eval_conditions(config, dataset.modality_names),
      batch_size=config.eval.batch_size, seed=config.eval.seed,
      progress=lambda it: tqdm(it, desc="protocol", unit="condition",
                               disable=not run.is_main, dynamic_ncols=True))
  headline = HEADLINE[dataset.task]
  summary["valid"] = evaluate_split(predict, final_params, dataset.splits["valid"],
                                    config.eval.batch_size, final_method_state)
  summary["protocol"] = result.to_dict()
  summary["headline_metric"] = headline
  record = {k: v for k, v in summary.items() if k not in ("final_params", "final_state")}
  record["provenance"] = provenance(seed=config.seed, eval_seed=config.eval.seed)
  if run.is_main:
    # written whole, then renamed: a run is finished once results.json exists, and
    # other processes (compare's shards, --collect) may read it at any moment
    path = os.path.join(run.workdir, "results.json")
    with open(path + ".tmp", "w") as f:
      json.dump(record, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    with open(os.path.join(run.workdir, "results.md"), "w") as f:
      f.write(render_results(record, result))
    plot_protocol(result, headline, os.path.join(run.workdir, "results.png"),
                  title=f"{method.name} on {dataset.name}, {config.eval.split} split")
    # the table's headline metric per condition, e.g. test/accuracy/text only
    with EventWriter(run.workdir, enabled=config.train.tensorboard, process_index=0) as tb:
      tb.scalars(config.train.steps, {row["condition"]: row[headline]
                                      for row in summary["protocol"]["rows"]},
                 prefix=f"{config.eval.split}/{headline}/")
  summary["table"] = result
  return summary


def render_results(record: dict, result: protocol.ProtocolResult) -> str:
  """The markdown report: what ran, where, and the protocol table."""
  prov = record["provenance"]
  cfg = record["config"]
  lines = [
      f"# {record['method']} on {record['dataset']} ({record['task']}), "
      f"{cfg['eval']['split']} split",
      "",
      *markdown_lines(prov, f"{record['devices']} device(s) x {record['processes']} "
                      "process(es)"),
      f"- seeds: model/data {cfg['seed']}, protocol {cfg['eval']['seed']}",
      f"- training: {record['steps']} steps, batch {cfg['train']['batch_size']}, "
      f"{record['train_seconds_total']:.1f} s in all, {record['nonfinite_skipped']} non-finite "
      "steps skipped",
      *([f"- trained on {', '.join(cfg['train']['present'])} only (`train.present`: the other "
         "modalities absent from the train and valid splits; the test split has every one)"]
        if cfg["train"].get("present") else []),
      "",
      result.to_markdown(digits=4),
      "",
  ]
  return "\n".join(lines)
