"""What a configuration key may hold: the rules behind every config check.

The bottom of the configuration layer (no model, no method): :class:`Key`
states one key's rule (and, for a method's meta-parameters, where its value
comes from); :func:`check` applies it with a one-line :class:`ConfigError`
that names the key. A method declares its keys once, as a ``NamedTuple`` of
settings whose fields are annotated with their rule (:func:`section` turns it
into the method's config section, :func:`settings_of` turns that section back
into the settings):

  >>> class Settings(NamedTuple):
  ...   rate: Annotated[float, Key("ours: the kept fraction", within="[0, 1)")] = 0.3
  >>> section(Settings)                       # ConfigDict(rate=0.3)
  >>> check("method.mine.rate", 1.5, 0.3, rules(Settings)["rate"])   # ConfigError
"""

from __future__ import annotations

import copy
import math
import typing
from typing import Any, NamedTuple

import ml_collections

__all__ = ["ConfigError", "Key", "check", "rules", "section", "settings_of", "flatten",
           "with_overrides", "FREE_FORM"]

# Keys whose contents are free-form (not checked against the schema).
FREE_FORM = ("data.synthetic.shapes",)


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the key."""


class Key(NamedTuple):
  """The rule of one config key (the type comes from its default).

  Attributes:
    doc: where the value comes from and why; for a method's meta-parameter the
      first word is its source (``code``, ``paper``, ``reimpl.``, ``METHOD.md``
      or ``ours``), as ``experiments/configs/METHODS.md`` shows it.
    choices: the allowed values (strings), if only some are.
    within: an interval such as ``"[0, 1)"`` or ``"(0, inf)"``.
    integer: the value must be an integer.
    each: for a list key, the rule of every element.
  """
  doc: str = ""
  choices: tuple = ()
  within: str = ""
  integer: bool = False
  each: "Key | None" = None


def _interval(within: str) -> tuple[float, float, bool, bool]:
  low, high = within[1:-1].split(",")
  return float(low), float(high), within[0] == "(", within[-1] == ")"


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fits(value, rule: Key) -> bool:
  """Whether one scalar value obeys ``rule`` (choices, integer, interval)."""
  if rule.choices and value not in rule.choices:
    return False
  if rule.integer and (isinstance(value, bool) or not isinstance(value, int)):
    return False
  if rule.within:
    if not _number(value):
      return False
    low, high, low_open, high_open = _interval(rule.within)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below
  return True


def _what(rule: Key) -> str:
  """``rule`` in words, for messages."""
  if rule.choices:
    return f"one of {rule.choices}"
  kind = "an integer" if rule.integer else "a number"
  if rule.within == "(0, inf)":
    return "positive" if not rule.integer else "a positive integer"
  if rule.within.endswith("inf)") and rule.within.startswith("["):
    return f"{kind} >= {_interval(rule.within)[0]:g}"
  if rule.within:
    low, high, low_open, high_open = _interval(rule.within)
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  return kind if rule.integer else "valid"


def check(key: str, value: Any, default: Any, rule: Key | None = None) -> None:
  """Raises :class:`ConfigError` naming ``key`` unless ``value`` has the type of
  ``default`` and obeys ``rule``.

  Example:
    >>> check("train.steps", 0, 1000, Key(within="(0, inf)"))
    ConfigError: config key 'train.steps' must be positive, got 0
  """
  if isinstance(default, bool) and not isinstance(value, bool):
    raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
  if isinstance(default, (int, float)) and not isinstance(default, bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
  if rule is None:
    return
  if rule.each is not None:
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"config key {key!r} must be a list of values, each "
                        f"{_what(rule.each)}, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not _fits(v, rule.each)]
    if bad:
      raise ConfigError(f"config key {key!r} must be a list of values, each "
                        f"{_what(rule.each)}; {bad[0]!r} is not")
    return
  if not _fits(value, rule):
    raise ConfigError(f"config key {key!r} must be {_what(rule)}, got {value!r}")


def rules(settings: type) -> dict[str, Key]:
  """``{field: Key}`` of a settings ``NamedTuple`` whose fields are annotated
  ``Annotated[type, Key(...)]`` (a field without a :class:`Key` gets ``Key()``)."""
  try:
    hints = typing.get_type_hints(settings, include_extras=True)
  except NameError as e:  # string annotations of a module that is not in sys.modules
    raise TypeError(f"cannot read the annotations of {settings.__qualname__} ({e}): define "
                    "it in an importable module, or without "
                    "'from __future__ import annotations'") from e
  out = {}
  for field in settings._fields:
    meta = getattr(hints.get(field), "__metadata__", ())
    out[field] = next((m for m in meta if isinstance(m, Key)), Key())
  return out


def section(settings: type) -> ml_collections.ConfigDict:
  """The config section of a settings ``NamedTuple``: one key per field, its default."""
  return ml_collections.ConfigDict(dict(settings._field_defaults))


def settings_of(settings: type, values) -> Any:
  """The settings ``NamedTuple`` of a config section (lists become tuples)."""
  frozen = lambda v: tuple(v) if isinstance(v, list) else v
  return settings(**{f: frozen(values[f]) for f in settings._fields})


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
