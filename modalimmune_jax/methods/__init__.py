"""Training methods, one module each, all plugging into one training loop.

Every method module declares a :class:`~modalimmune_jax.methods.base.MethodSpec`
named ``SPEC``. The built-in ones are found by module name (:data:`BUILTIN`,
one line per method); a method of your own registers its spec with
:func:`register` (from its module or your config file) and is then used like
any other: ``config.method.name``, its section ``config.method.<name>``,
``compare --methods=<name>``. The loop only sees the
:class:`~modalimmune_jax.methods.base.Method` that :func:`from_config` builds.

Example:
  >>> spec = get("dropout")
  >>> spec.settings().rate, spec.search[0]
  (0.3, {'method.dropout.rate': 0.3})
  >>> method = from_config(config, model_fns, dataset)
"""

from __future__ import annotations

import importlib

from modalimmune_jax import schema
from modalimmune_jax.methods.base import (Method, MethodSpec, ModelFns, reconstruction_loss,
                                          task_loss)

__all__ = ["Method", "MethodSpec", "ModelFns", "task_loss", "reconstruction_loss", "BUILTIN",
           "register", "unregister", "get", "names", "registered", "settings", "model_parts",
           "from_config"]

# The built-in methods, in the order tables list them: modalimmune_jax.methods.<name>.SPEC
BUILTIN = ("plain", "dropout", "consistency", "ebr", "distill", "cmpt", "opm", "ogm_ge",
           "modalimmune")

_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
  """Makes ``spec`` a method that configs, ``main`` and ``compare`` know by name.

  Registering the same name again replaces the spec (a config file may be
  loaded twice), except a built-in method's name, which is refused.
  """
  if not isinstance(spec, MethodSpec):
    raise TypeError(f"register takes a MethodSpec, got {type(spec).__name__}")
  if not spec.name.isidentifier():
    raise ValueError(f"a method's name must be an identifier (it names a config section), "
                     f"got {spec.name!r}")
  old = _REGISTRY.get(spec.name)
  if old is not None and spec.name in BUILTIN and old is not spec:
    raise ValueError(f"{spec.name!r} is a built-in method; choose another name")
  _REGISTRY[spec.name] = spec
  return spec


def unregister(name: str) -> None:
  """Forgets a method of your own (a built-in one stays)."""
  if name in BUILTIN:
    raise ValueError(f"{name!r} is a built-in method")
  _REGISTRY.pop(name, None)


def registered() -> list[MethodSpec]:
  """Every registered method: the built-in ones first, then yours."""
  return list(_REGISTRY.values())


def names() -> tuple[str, ...]:
  return tuple(spec.name for spec in registered())


def get(name: str) -> MethodSpec:
  """The spec of method ``name`` (``ConfigError`` naming the known ones if none)."""
  if name not in _REGISTRY:
    raise schema.ConfigError(f"config key 'method.name' must be one of {names()}, got "
                             f"{name!r} (a method of your own: methods.register(SPEC) first)")
  return _REGISTRY[name]


def settings(config, name: str | None = None):
  """The settings ``NamedTuple`` of ``config.method.<name>`` (default: the
  configured method)."""
  spec = get(name or config.method.name)
  if not spec.settings._fields:
    return spec.settings()
  return schema.settings_of(spec.settings, config.method[spec.name])


def model_parts(config) -> dict:
  """The extra ``MultimodalModel`` arguments the configured method needs."""
  spec = get(config.method.name)
  return {} if spec.model_parts is None else dict(spec.model_parts(settings(config)))


def from_config(config, model: ModelFns, dataset) -> Method:
  """The method ``config.method.name`` names, for ``model`` on ``dataset``."""
  spec = get(config.method.name)
  return spec.build(settings(config), config, model, dataset)


for _name in BUILTIN:
  register(importlib.import_module(f"modalimmune_jax.methods.{_name}").SPEC)
