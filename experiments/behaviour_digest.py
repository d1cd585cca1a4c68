"""Fingerprints of what training computes, to show a change of code changed nothing.

    python experiments/behaviour_digest.py [--methods plain,modalimmune] [--out DIR]
    python experiments/behaviour_digest.py --compare A/behaviour_digest.json B/behaviour_digest.json

Trains each method on the mfeat smoke config (12 steps; every periodic part of
ModalImmune fires) and records SHA-256 digests of the final parameters, of the
final method state and of the protocol table, plus the ``full`` row. Run it
at two commits (``git stash`` / ``git worktree``) and ``--compare`` the two
files: equal digests are bit-identical training and evaluation. The digests
depend on the machine (XLA's CPU code differs between processors), so compare
files written on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

from harness import get_config, log, parser, write_results


def digest(tree) -> str:
  """SHA-256 of the bytes of every leaf of ``tree`` (keys by their raw data)."""
  import jax
  import numpy as np
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def fingerprint(method: str, workdir: str) -> dict:
  from modalimmune_jax import train
  config = get_config("mfeat", "smoke", overrides={"method.name": method})
  summary = train.train_and_evaluate(config, workdir)
  rows = summary["protocol"]["rows"]
  return {"params": digest(summary["final_params"]),
          "method_state": digest(summary["final_state"].method_state),
          "protocol": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
          "full": rows[0]}


def compare(a: str, b: str) -> int:
  """Prints which digests agree; 0 when all do."""
  with open(a) as f:
    old = json.load(f)["methods"]
  with open(b) as f:
    new = json.load(f)["methods"]
  same = True
  for method in sorted(set(old) | set(new)):
    for part in ("params", "method_state", "protocol"):
      equal = old.get(method, {}).get(part) == new.get(method, {}).get(part)
      same &= equal
      print(f"{method:12s} {part:13s} {'identical' if equal else 'DIFFERENT'}")
  return 0 if same else 1


def main(argv=None) -> int:
  p = parser(__doc__, "behaviour_digest", quick=False)
  p.add_argument("--methods", default="plain,modalimmune", help="comma-separated methods")
  p.add_argument("--compare", nargs=2, metavar="JSON", help="compare two digest files")
  args = p.parse_args(argv)
  if args.compare:
    return compare(*args.compare)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for method in args.methods.split(","):
      log(f"training {method} (mfeat smoke)")
      results[method] = fingerprint(method, os.path.join(tmp, method))
  write_results(args.out, "behaviour_digest", {"methods": results, "config": "mfeat:smoke"})
  print(json.dumps(results, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
