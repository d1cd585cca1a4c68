"""What every command line of the project shares.

* :func:`run`: ``absl.app.run`` with a flag parser that turns a bad flag or
  config override into one line on stderr and exit code 2 (an unknown
  ``--config.KEY`` gets the schema's did-you-mean), and a ``main`` whose user
  errors (bad config value, data file, work directory) end the same way. A
  ``--debug`` flag shows the traceback instead.
* :func:`enable_compile_cache`: XLA's persistent compilation cache, on by
  default for the command lines, so a rerun or a resume does not recompile.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Callable

from absl import app, flags

__all__ = ["run", "enable_compile_cache", "quiet_logging", "DEFAULT_CACHE", "FlagError"]

FLAGS = flags.FLAGS


class FlagError(ValueError):
  """A command-line flag with a value the command cannot use; names the flag."""


flags.DEFINE_bool("debug", False, "Show the traceback of an error.")
DEFAULT_CACHE = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                 "modalimmune_jax", "xla"))
flags.DEFINE_string("compile_cache", DEFAULT_CACHE,
                    "Directory of XLA's persistent compilation cache ('' = off).")


def _config_override_error(argv) -> str | None:
  """One line for the first ``--config.KEY=VALUE`` whose KEY the schema lacks."""
  from modalimmune_jax.config import base_config, flatten
  known = list(flatten(base_config()))
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key not in known and not any(k.startswith(key + ".") for k in known) \
        and not key.startswith("data.synthetic.shapes."):
      hint = difflib.get_close_matches(key, known, n=1)
      return (f"unknown config key {key!r} in {arg.split('=', 1)[0]}"
              + (f"; did you mean {hint[0]!r}?" if hint else ""))
  return None


def _first_line(e: BaseException) -> str:
  """The line of a (possibly wrapped, multi-line) error that says what is wrong."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  errno = [ln for ln in lines if "Errno" in ln or ln.startswith(("ValueError", "KeyError"))]
  line = errno[-1] if errno else lines[0] if lines else type(e).__name__
  for prefix in ("ValueError: ", "KeyError: "):
    line = line.removeprefix(prefix)
  return line


def _parse(argv):
  debug = "--debug" in argv or "--debug=true" in argv
  message = _config_override_error(argv)
  if message is None:
    try:
      rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags, config file or override errors
      if debug:
        raise
      message = _first_line(e)
    else:
      try:
        if "config" in FLAGS:
          FLAGS.config.keys()  # the config file loads lazily: load it now
        return rest
      except Exception as e:  # noqa: BLE001
        if debug:
          raise
        message = f"--config={FLAGS['config'].serialize().split('=', 1)[-1]}: {_first_line(e)}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
  from modalimmune_jax.config import ConfigError
  from modalimmune_jax.data import DataError
  from modalimmune_jax.train import WorkdirError
  return (ConfigError, DataError, WorkdirError, FlagError)


def run(main: Callable[[list[str]], int]) -> None:
  """``app.run(main)`` with one-line errors (exit 2 for user errors, 1 for a
  run stopped on non-finite values, 128 + signal for SIGTERM / SIGINT)."""
  def wrapped(argv):
    from modalimmune_jax.train import Interrupted, NonFiniteError
    try:
      return main(argv)
    except Interrupted as e:
      print(f"stopped: {e}", file=sys.stderr)
      return 128 + e.signum
    except Exception as e:  # noqa: BLE001
      if FLAGS.debug:
        raise
      if isinstance(e, user_errors()):
        print(f"error: {e}", file=sys.stderr)
        return 2
      if isinstance(e, NonFiniteError):
        print(f"error: {e}", file=sys.stderr)
        return 1
      raise
  app.run(wrapped, flags_parser=_parse)


def quiet_logging() -> None:
  """INFO for this package (resume messages), WARNING for JAX and orbax."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" noise
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
  logging.getLogger("modalimmune_jax").setLevel(logging.INFO)


def enable_compile_cache(directory: str | None = None) -> str | None:
  """Turns on XLA's persistent compilation cache in ``directory`` (default
  ``--compile_cache``; '' = off). Returns the directory used."""
  import jax
  directory = FLAGS.compile_cache if directory is None else directory
  if not directory:
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory
