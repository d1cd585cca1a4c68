"""The missing-modality evaluation protocol.

A :class:`Condition` turns a clean split into a degraded one plus a presence
mask ``(N, M)`` that the model receives in ``batch["presence"]``; how the model
fills a missing modality is the model's business. The field uses at least four
meanings of "missing rate" (``../shared/BASELINES.md``), and numbers under
different meanings do not compare: every condition names its *convention*
(:data:`CONVENTIONS`), and the tables print it beside the condition.

* :func:`removal_conditions`: every non-empty proper subset of the modalities
  kept, named by what is kept (``"text+audio"``, ``"text only"``), plus
  ``"full"``: the fixed-subset table of MMIN (6 conditions for 3 modalities).
  Removed modalities are zeroed, their frame masks cleared and their presence
  bit cleared.
* :func:`random_missing`: each (sample, modality) is missing with probability
  ``rate``; a sample that would lose every modality keeps one chosen uniformly
  at random (ours, "independent-cell").
* :func:`cell_missing`: cell-eta as CPM-Net and GCNet define it: exactly a
  fraction ``eta`` of the (sample, modality) cells missing, at least one
  modality kept per sample, ``eta <= (M - 1) / M``.
* :func:`sample_missing`: sample-eta as MAP and CMPT define it: a fraction
  ``rate`` of the samples miss one or more modalities, split equally between
  the missing patterns.
* :func:`frame_missing`: each real frame of each (chosen) modality is zeroed
  with probability ``rate`` (MMSA, TFR-Net, Yuan et al. 2021); lengths and
  padding are untouched and presence stays on.
* :func:`gaussian_noise`: additive Gaussian noise on the real frames at a
  signal-to-noise ratio in dB, with the signal power measured per modality on
  the evaluated split.

A split that lacks some modalities altogether (``MultimodalSplit.absent``: the
train and valid splits of a run with ``train.present``) keeps them absent under
every condition: the condition applies on top (a condition that keeps only
absent modalities leaves a sample with none).

Every condition is deterministic given ``seed`` and its own name (the random
stream is ``np.random.default_rng([seed, crc32(name)])``), so adding a condition
never changes another's draw. A random condition can be evaluated under
several fixed mask draws (``draws``; draw ``d > 0`` uses the stream
``[seed, crc32(name), d]``, draw 0 is the single draw above) and is then
reported as the mean over draws with its spread. :func:`evaluate` runs a
prediction function under each condition and returns a :class:`ProtocolResult`
that renders as a markdown table and as JSON.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from modalimmune_jax.data.core import MultimodalSplit
from modalimmune_jax.masking import check_cell_eta, keep_patterns, missing_count
from modalimmune_jax.metrics import compute_metrics

__all__ = [
    "Condition",
    "CONVENTIONS",
    "full",
    "keep_only",
    "removal_conditions",
    "drop_one_conditions",
    "keep_one_conditions",
    "REMOVALS",
    "random_missing",
    "cell_missing",
    "sample_missing",
    "cell_eta_mask",
    "sample_eta_mask",
    "frame_missing",
    "gaussian_noise",
    "standard_conditions",
    "MISSING_KINDS",
    "selection_score",
    "ProtocolResult",
    "evaluate",
]

Degraded = tuple[MultimodalSplit, np.ndarray]

# Condition kind -> the missing-rate convention it follows (../shared/BASELINES.md,
# "What 'missing rate' means").
CONVENTIONS = {
    "full": "clean",
    "removal": "fixed-subset (MMIN)",
    "random_missing": "independent-cell",
    "cell_missing": "cell-eta (CPM-Net/GCNet)",
    "sample_missing": "sample-eta (MAP/CMPT)",
    "frame_missing": "frame-rate (MMSA/TFR-Net)",
    "gaussian_noise": "noise",
}
# Kinds whose degradation is random (evaluated under ``draws`` masks).
RANDOM_KINDS = ("random_missing", "cell_missing", "sample_missing", "frame_missing",
                "gaussian_noise")


@dataclasses.dataclass(frozen=True)
class Condition:
  """A named way of degrading a split.

  ``fn(split, rng) -> (degraded split, presence (N, M) bool)``. ``convention``
  names the meaning of its rate (default: :data:`CONVENTIONS` of ``kind``);
  ``draws`` is the number of fixed mask draws :func:`evaluate` averages over
  (only for random kinds; deterministic conditions run once).
  """
  name: str
  kind: str
  params: dict
  fn: Callable[[MultimodalSplit, np.random.Generator], Degraded] = dataclasses.field(
      repr=False, compare=False)
  convention: str = ""
  draws: int = 1

  def __post_init__(self):
    if not self.convention:
      object.__setattr__(self, "convention", CONVENTIONS.get(self.kind, self.kind))
    if not isinstance(self.draws, int) or self.draws < 1:
      raise ValueError(f"draws must be a positive integer, got {self.draws!r}")

  @property
  def random(self) -> bool:
    return self.kind in RANDOM_KINDS

  def apply(self, split: MultimodalSplit, seed: int = 0, draw: int = 0) -> Degraded:
    """The degraded split and presence of mask draw ``draw`` (0: the one draw).
    A split's :attr:`~modalimmune_jax.data.MultimodalSplit.absent` modalities
    stay absent (their presence off on top of the condition's; the draws are
    the same as on the full split)."""
    stream = [seed, zlib.crc32(self.name.encode())] + ([draw] if draw else [])
    degraded, presence = self.fn(split, np.random.default_rng(stream))
    if split.absent:
      presence = presence & split.present_row
    return degraded, presence

  def with_draws(self, draws: int) -> "Condition":
    """The same condition evaluated under ``draws`` mask draws (random kinds only)."""
    return dataclasses.replace(self, draws=draws if self.random else 1)


def _remove(split: MultimodalSplit, presence: np.ndarray) -> MultimodalSplit:
  """Zeroes the features and clears the masks where ``presence`` is False."""
  mods, masks = {}, {}
  for j, m in enumerate(split.modality_names):
    keep = presence[:, j]
    mods[m] = np.where(keep[:, None, None], split.modalities[m], 0.0).astype(np.float32)
    masks[m] = split.masks[m] & keep[:, None]
  return dataclasses.replace(split, modalities=mods, masks=masks)


def full() -> Condition:
  """All modalities present (the clean split)."""
  return Condition("full", "full", {}, lambda s, rng: (
      s, np.ones((s.num_samples, len(s.modality_names)), bool)))


def _subset_name(kept: Sequence[str]) -> str:
  return f"{kept[0]} only" if len(kept) == 1 else "+".join(kept)


def keep_only(kept: Sequence[str]) -> Condition:
  """Only the modalities in ``kept`` are present (fixed removal of the rest)."""
  kept = tuple(kept)

  def fn(split, rng):
    unknown = set(kept) - set(split.modality_names)
    if unknown:
      raise ValueError(f"unknown modalities {sorted(unknown)}; split has "
                       f"{split.modality_names}")
    row = np.array([m in kept for m in split.modality_names])
    presence = np.broadcast_to(row, (split.num_samples, len(row))).copy()
    return _remove(split, presence), presence
  return Condition(_subset_name(kept), "removal", {"kept": list(kept)}, fn)


def removal_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Every non-empty proper subset kept, largest first, in modality order: MMIN's
  fixed-condition table (convention "fixed-subset (MMIN)"; 6 conditions for 3
  modalities, MoMKE's 7 adds ``full``)."""
  names = tuple(modality_names)
  out = []
  for size in range(len(names) - 1, 0, -1):
    for kept in itertools.combinations(names, size):
      out.append(keep_only(kept))
  return out


def drop_one_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Each modality removed alone (``M`` conditions, named by what is kept)."""
  names = tuple(modality_names)
  return [keep_only([m for m in names if m != drop]) for drop in names]


def keep_one_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Each modality alone (``"text only"``, ...)."""
  return [keep_only([m]) for m in modality_names]


REMOVALS = {
    "all": removal_conditions,
    "drop_one": drop_one_conditions,
    "keep_one": keep_one_conditions,
    "drop_one+keep_one": lambda names: drop_one_conditions(names) + keep_one_conditions(names),
    "none": lambda names: [],
}


def random_missing(rate: float) -> Condition:
  """Each (sample, modality) missing with probability ``rate``; one always kept."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate must be in [0, 1), got {rate}")

  def fn(split, rng):
    n, k = split.num_samples, len(split.modality_names)
    presence = rng.random((n, k)) >= rate
    empty = ~presence.any(1)
    presence[np.flatnonzero(empty), rng.integers(0, k, size=int(empty.sum()))] = True
    return _remove(split, presence), presence
  return Condition(f"missing rate {rate:g}", "random_missing", {"rate": rate}, fn)


def cell_eta_mask(rng: np.random.Generator, num_samples: int, num_modalities: int,
                  eta: float) -> np.ndarray:
  """``(N, M)`` presence of :func:`cell_missing` (numpy form of
  :func:`modalimmune_jax.masking.cell_eta_presence`, the same algorithm)."""
  n, m = num_samples, num_modalities
  check_cell_eta(eta, m)
  guaranteed = rng.integers(0, m, size=n)
  scores = rng.random((n, m))
  scores[np.arange(n), guaranteed] = 2.0  # the guaranteed cells rank first
  order = np.argsort(-scores.reshape(-1), kind="stable")
  presence = np.zeros(n * m, bool)
  presence[order[:n * m - missing_count(n, m, eta)]] = True
  return presence.reshape(n, m)


def sample_eta_mask(rng: np.random.Generator, num_samples: int, num_modalities: int,
                    rate: float, patterns: str = "any") -> np.ndarray:
  """``(N, M)`` presence of :func:`sample_missing` (numpy form of
  :func:`modalimmune_jax.masking.sample_eta_presence`, the same algorithm)."""
  table = keep_patterns(num_modalities, patterns)
  rank = np.argsort(rng.permutation(num_samples))  # each sample's place in a random order
  order = rng.permutation(len(table))
  hit = (rank < round(rate * num_samples))[:, None]
  return np.where(hit, table[order[rank % len(table)]], True)


def cell_missing(eta: float, num_modalities: int | None = None) -> Condition:
  """Cell-eta (CPM-Net, GCNet): exactly ``round(eta * N * M)`` of the ``N * M``
  (sample, modality) cells missing, at least one modality kept per sample.

  ``eta`` must be at most ``(M - 1) / M`` (checked here when ``num_modalities``
  is given, else when the condition is applied). The construction is GCNet's
  ``random_mask`` (zeroQiaoba/GCNet, after CPM-Net's ``get_sn``): one modality per
  sample kept uniformly at random, the other kept cells uniformly among the
  rest; GCNet redraws until the kept fraction is within 0.005 of ``1 - eta``,
  we draw the exact count (GCNet's distribution conditioned on the count;
  :func:`modalimmune_jax.masking.cell_eta_presence` is the jnp form).

  Example:
    >>> degraded, presence = cell_missing(0.5).apply(split, seed=0)
    >>> 1 - presence.mean()   # 0.5 up to rounding to whole cells
  """
  if not 0.0 <= eta < 1.0:
    raise ValueError(f"cell eta must be in [0, (M-1)/M], got {eta}")
  if num_modalities is not None:
    check_cell_eta(eta, num_modalities)

  def fn(split, rng):
    presence = cell_eta_mask(rng, split.num_samples, len(split.modality_names), eta)
    return _remove(split, presence), presence
  return Condition(f"cell eta {eta:g}", "cell_missing", {"eta": eta}, fn)


def sample_missing(rate: float, patterns: str = "any") -> Condition:
  """Sample-eta (MAP, CMPT): ``round(rate * N)`` samples, chosen uniformly without
  replacement, miss one or more modalities; the rest are complete.

  The affected samples are split as equally as possible between the missing
  patterns (:func:`modalimmune_jax.masking.keep_patterns`): ``"any"``, every
  non-empty proper subset kept; ``"single"``, one modality missing. MAP
  (``vilt/datasets/base_dataset.py``, missing type "both", ``both_ratio=0.5``)
  splits them 50:50 between "text missing" and "image missing", which both
  options reproduce for two modalities; MAP takes ``int(rate * N)`` samples, we
  round (``int(0.57 * 100)`` is 56). :func:`modalimmune_jax.masking.sample_eta_presence`
  is the jnp form.

  Example:
    >>> degraded, presence = sample_missing(0.7).apply(split, seed=0)
    >>> (~presence.all(1)).mean()   # 0.7 up to rounding to whole samples
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"sample eta must be in [0, 1], got {rate}")
  keep_patterns(3, patterns)  # checks the name

  def fn(split, rng):
    presence = sample_eta_mask(rng, split.num_samples, len(split.modality_names), rate,
                               patterns)
    return _remove(split, presence), presence
  suffix = "" if patterns == "any" else f" ({patterns})"
  return Condition(f"sample eta {rate:g}{suffix}", "sample_missing",
                   {"rate": rate, "patterns": patterns}, fn)


def frame_missing(rate: float, modalities: Sequence[str] | None = None) -> Condition:
  """Each real frame zeroed with probability ``rate`` (TFR-Net style)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate must be in [0, 1], got {rate}")
  which = None if modalities is None else tuple(modalities)

  def fn(split, rng):
    mods = dict(split.modalities)
    for m in split.modality_names:  # draw for every modality: stable streams
      drop = (rng.random(split.masks[m].shape) < rate) & split.masks[m]
      if which is None or m in which:
        mods[m] = np.where(drop[..., None], 0.0, mods[m]).astype(np.float32)
    presence = np.ones((split.num_samples, len(mods)), bool)
    return dataclasses.replace(split, modalities=mods), presence
  suffix = "" if which is None else f" ({'+'.join(which)})"
  return Condition(f"frame missing {rate:g}{suffix}", "frame_missing",
                   {"rate": rate, "modalities": which}, fn)


def gaussian_noise(snr_db: float, modalities: Sequence[str] | None = None) -> Condition:
  """Additive Gaussian noise at ``snr_db`` on the real frames."""
  which = None if modalities is None else tuple(modalities)

  def fn(split, rng):
    mods = dict(split.modalities)
    for m in split.modality_names:
      x, mask = split.modalities[m], split.masks[m]
      noise = rng.normal(size=x.shape)
      if which is not None and m not in which:
        continue
      frames = x[mask]
      power = float(np.mean(frames.astype(np.float64) ** 2)) if frames.size else 0.0
      sigma = np.sqrt(power / 10.0 ** (snr_db / 10.0))
      mods[m] = np.where(mask[..., None], x + sigma * noise, x).astype(np.float32)
    presence = np.ones((split.num_samples, len(mods)), bool)
    return dataclasses.replace(split, modalities=mods), presence
  suffix = "" if which is None else f" ({'+'.join(which)})"
  return Condition(f"noise {snr_db:g} dB{suffix}", "gaussian_noise",
                   {"snr_db": snr_db, "modalities": which}, fn)


def standard_conditions(modality_names: Sequence[str],
                        missing_rates: Iterable[float] = (0.3, 0.5, 0.7),
                        frame_rates: Iterable[float] = (),
                        snrs_db: Iterable[float] = (10.0, 0.0),
                        removals: str = "all", *,
                        cell_etas: Iterable[float] = (),
                        sample_rates: Iterable[float] = (),
                        sample_patterns: str = "any",
                        draws: int = 1) -> list[Condition]:
  """``full``, the fixed removals named by ``removals`` (a key of :data:`REMOVALS`,
  default every subset), independent-cell missing rates, cell-etas, sample-etas,
  frame rates, noise levels; every random one evaluated under ``draws`` masks.

  Example:
    >>> conds = standard_conditions(("text", "audio", "vision"), cell_etas=(0.3, 0.6),
    ...                             sample_rates=(0.7,), draws=5)
  """
  if not isinstance(draws, int) or draws < 1:
    raise ValueError(f"draws must be a positive integer, got {draws!r}")
  m = len(tuple(modality_names))
  conds = ([full()] + REMOVALS[removals](modality_names)
           + [random_missing(r) for r in missing_rates]
           + [cell_missing(e, m) for e in cell_etas]
           + [sample_missing(r, sample_patterns) for r in sample_rates]
           + [frame_missing(r) for r in frame_rates]
           + [gaussian_noise(s) for s in snrs_db])
  return [c.with_draws(draws) for c in conds] if draws != 1 else conds


# The kinds of condition that miss something (the selection score's and the
# comparison's "mean missing").
MISSING_KINDS = ("removal", "random_missing", "cell_missing", "sample_missing",
                 "frame_missing")


def selection_score(protocol_dict: dict, metric: str) -> float:
  """Mean ``metric`` over ``full`` and the missing-modality conditions of a
  :meth:`ProtocolResult.to_dict` (what model selection and tuning compare)."""
  kinds = {c["name"]: c["kind"] for c in protocol_dict["meta"]["conditions"]}
  values = [r[metric] for r in protocol_dict["rows"]
            if kinds[r["condition"]] in ("full",) + MISSING_KINDS and r[metric] is not None]
  return float(sum(values) / len(values))


@dataclasses.dataclass
class ProtocolResult:
  """Metrics per condition. Rows keep the order the conditions were run in.

  ``rows``: ``(condition name, metrics)``; for a condition evaluated under
  several mask draws, the mean over draws. ``spread``: condition name ->
  metric -> standard deviation over its draws (``ddof=1``; only conditions with
  more than one draw). ``meta["conditions"]`` lists each condition's ``kind``,
  ``convention``, ``params`` and ``draws``.
  """
  rows: list[tuple[str, dict[str, float]]]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  spread: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  def metric_names(self) -> list[str]:
    names: list[str] = []
    for _, metrics in self.rows:
      names += [k for k in metrics if k not in names]
    return names

  def conventions(self) -> dict[str, str]:
    """Condition name -> its missing-rate convention (from ``meta``)."""
    return {c["name"]: c.get("convention", "") for c in self.meta.get("conditions", [])}

  def to_markdown(self, metrics: Sequence[str] | None = None, digits: int = 4,
                  percent: bool = False) -> str:
    """A markdown table: one row per condition (with its convention), one column
    per metric; ``mean ± std`` over mask draws where a condition had several."""
    metrics = list(metrics or self.metric_names())
    conventions = self.conventions()
    lines = ["| condition | convention | " + " | ".join(metrics) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for name, values in self.rows:
      cells = []
      spread = self.spread.get(name, {})
      for k in metrics:
        v = values.get(k, float("nan"))
        scale = 100.0 if percent and k not in ("MAE", "Corr") else 1.0
        if v is None or not np.isfinite(v):
          cells.append("n/a")
          continue
        cell = f"{scale * v:.{digits}f}"
        if k in spread and np.isfinite(spread[k]):
          cell += f" ± {scale * spread[k]:.{digits}f}"
        cells.append(cell)
      lines.append(f"| {name} | {conventions.get(name, '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    """JSON rows: ``condition``, ``convention``, the metrics and, for conditions
    with several mask draws, ``<metric>_std``."""
    conventions = self.conventions()
    finite = lambda v: None if v is None or not np.isfinite(v) else float(v)
    rows = []
    for n, m in self.rows:
      row = {"condition": n, "convention": conventions.get(n, "")}
      row.update({k: finite(v) for k, v in m.items()})
      row.update({f"{k}_std": finite(v) for k, v in self.spread.get(n, {}).items()})
      rows.append(row)
    return {"rows": rows, "meta": self.meta}

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def get(self, condition: str) -> dict[str, float]:
    for name, values in self.rows:
      if name == condition:
        return values
    raise KeyError(f"no condition {condition!r}; have {[n for n, _ in self.rows]}")


def _mean_and_std(per_draw: list[dict]) -> tuple[dict, dict]:
  """Mean and standard deviation (``ddof=1``) over draws of each metric."""
  means, stds = {}, {}
  for k in per_draw[0]:
    vals = np.array([np.nan if d.get(k) is None else d[k] for d in per_draw], np.float64)
    means[k] = float(np.mean(vals))
    stds[k] = float(np.std(vals, ddof=1))
  return means, stds


def evaluate(predict_fn: Callable[[dict], Any], split: MultimodalSplit,
             conditions: Sequence[Condition], *, batch_size: int = 256, seed: int = 0,
             metrics_fn: Callable[[str, Any, Any], dict] = compute_metrics,
             progress: Callable[[Iterable], Iterable] | None = None,
             draws: int | None = None) -> ProtocolResult:
  """Runs ``predict_fn`` under every condition and computes the task's metrics.

  Args:
    predict_fn: ``batch dict -> outputs`` (``(B, ...)`` array-like), with
      ``batch["presence"]`` set by the condition.
    split: the clean split (e.g. test).
    conditions: from :func:`standard_conditions` or built by hand.
    batch_size: evaluation batch size (the last batch may be smaller).
    seed: protocol seed (see the module docstring).
    metrics_fn: ``(task, outputs, labels) -> dict``.
    progress: optional wrapper of the condition iterable (e.g. ``tqdm``).
    draws: mask draws per random condition (default: each condition's own
      ``draws``, 1 unless built with ``draws``). With more than one the row is
      the mean over draws and :attr:`ProtocolResult.spread` their standard
      deviation; draw 0 is the single draw of ``draws=1``.

  Example:
    >>> result = evaluate(predict, ds.splits["test"],
    ...                   standard_conditions(ds.modality_names), draws=5)
    >>> print(result.to_markdown(["accuracy", "macro_f1"]))
  """
  if draws is not None:
    if not isinstance(draws, int) or draws < 1:
      raise ValueError(f"draws must be a positive integer, got {draws!r}")
    conditions = [c.with_draws(draws) for c in conditions]
  rows, spread = [], {}
  iterable = progress(conditions) if progress else conditions
  for cond in iterable:
    per_draw = []
    for d in range(cond.draws):
      degraded, presence = cond.apply(split, seed, draw=d)
      outputs = []
      for idx in degraded.batch_indices(batch_size):
        batch = degraded.batch(idx)
        batch["presence"] = presence[idx]
        outputs.append(np.asarray(predict_fn(batch)))
      per_draw.append(metrics_fn(split.task, np.concatenate(outputs), split.labels))
    if len(per_draw) == 1:
      rows.append((cond.name, per_draw[0]))
    else:
      means, stds = _mean_and_std(per_draw)
      rows.append((cond.name, means))
      spread[cond.name] = stds
  return ProtocolResult(rows, meta={"seed": seed, "num_samples": split.num_samples,
                                    "conditions": [{"name": c.name, "kind": c.kind,
                                                    "convention": c.convention,
                                                    "params": c.params, "draws": c.draws}
                                                   for c in conditions]},
                        spread=spread)
