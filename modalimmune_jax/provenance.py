"""What produced a result: command, commit, machine, library versions.

Every result file this project writes carries :func:`provenance` so a number
can be traced back to the command, code and machine that measured it.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any


def _git(*args: str) -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                         timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def _command() -> str:
  """The command as typed: ``python -m pkg.mod args`` for ``-m`` runs."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = (["python", "-m", spec.name] if spec is not None and spec.name
          else [os.path.basename(sys.executable)] + sys.argv[:1])
  return " ".join(head + sys.argv[1:])


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


# XLA settings that trade run time for compile time on CPU, for programs that run a
# few steps (the tests, the experiments' --quick sizes), where compiling is most
# of the time. ModalImmune's smoke config, compile seconds of step / curvature
# refresh / hyper-step on the 2-core CPU: 5.9 / 12.8 / 14.8 with XLA's defaults,
# 3.7 / 8.1 / 10.6 with the first flag, 1.4 / 4.2 / 4.3 with all four.
QUICK_COMPILE_XLA_FLAGS = {"--xla_backend_optimization_level": "0",
                           "--xla_cpu_use_fusion_emitters": "false",
                           "--xla_cpu_parallel_codegen_split_count": "1",
                           "--xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def quick_compile_xla_flags(flags: str = "") -> str:
  """``flags`` (an ``XLA_FLAGS`` value) with :data:`QUICK_COMPILE_XLA_FLAGS`
  added where ``flags`` does not set them already. Takes effect only for a
  backend not yet started (set it before the first computation).

  Example:
    >>> os.environ["XLA_FLAGS"] = quick_compile_xla_flags(os.environ.get("XLA_FLAGS", ""))
  """
  extra = [f"{k}={v}" for k, v in QUICK_COMPILE_XLA_FLAGS.items() if k not in flags]
  return " ".join([flags, *extra]).strip()


def provenance(**extra: Any) -> dict[str, Any]:
  """A JSON-able record of the command, commit, machine and versions.

  Example:
    >>> record = {"results": ..., "provenance": provenance(seed=0)}
  """
  import jax  # imported here so that importing this module stays cheap

  status = _git("status", "--porcelain", "--untracked-files=no")
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy"):
    try:
      module = __import__(name, fromlist=["__version__"])
      versions[name] = getattr(module, "__version__", "?")
    except ImportError:
      pass
  return {
      "command": _command(),
      "cwd": os.getcwd(),
      "commit": _git("rev-parse", "HEAD"),
      "dirty": bool(status) if status is not None else None,
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {
          "platform": platform.platform(),
          "processor": _cpu_model(),
          "cpu_count": os.cpu_count(),
          "python": platform.python_version(),
          "jax_backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
      },
      "versions": versions,
      **extra,
  }


def markdown_lines(prov: dict[str, Any], *details: str) -> list[str]:
  """The ``- command``, ``- commit`` and ``- machine`` lines a markdown result
  file carries, from a :func:`provenance` record; ``details`` (device counts,
  a time, ...) join the machine line before the jax version.

  Example:
    >>> lines = ["# My result", ""] + markdown_lines(provenance(), "2 device(s)")
  """
  m = prov["machine"]
  machine = [m.get("processor") or m["platform"], m["platform"], f"{m['cpu_count']} cores",
             m.get("jax_backend", "?"), *details, f"jax {prov['versions'].get('jax')}"]
  return [f"- command: `{prov['command']}`",
          f"- commit: {prov['commit']}{' (dirty)' if prov['dirty'] else ''}",
          f"- machine: {', '.join(machine)}"]
