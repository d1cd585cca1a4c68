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
