"""``python -m modalimmune_jax.data describe NAME [--path FILE]``.

Prints the modalities, shapes, classes and split sizes of a data set, e.g.
``python -m modalimmune_jax.data describe mfeat``.
"""

from __future__ import annotations

import argparse
import sys

from modalimmune_jax.data import DATASETS, DataError, load_dataset


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m modalimmune_jax.data",
                                   description="Describe a data set.")
  sub = parser.add_subparsers(dest="command", required=True)
  d = sub.add_parser("describe", help="print modalities, shapes, classes, splits")
  d.add_argument("name", choices=DATASETS)
  d.add_argument("--path", help="pickle file (mosi / mosei / iemocap)")
  d.add_argument("--root", help="directory of the original UCI mfeat files")
  d.add_argument("--seed", type=int, default=0, help="split / generator seed")
  args = parser.parse_args(argv)
  kwargs = {}
  if args.name in ("mosi", "mosei", "iemocap"):
    kwargs["path"] = args.path
  elif args.name == "mfeat":
    kwargs.update(root=args.root, seed=args.seed)
  else:
    kwargs["seed"] = args.seed
  try:
    ds = load_dataset(args.name, **kwargs)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(ds.describe())
  return 0


if __name__ == "__main__":
  sys.exit(main())
