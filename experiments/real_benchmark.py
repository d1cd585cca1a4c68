"""The comparison on a real benchmark file, in one command: CMU-MOSI, CMU-MOSEI or IEMOCAP.

    python experiments/real_benchmark.py --data mosi --file PATH
        [--methods plain,dropout,...] [--seeds 0,1,2,3,4] [--workdir runs/real_benchmark]
        [--out DIR] [--quick] [COMPARE FLAGS ...]

``PATH`` is the user's own pickle, in MulT's layout (``mosi_data.pkl``,
``mosei_senti_data.pkl``, ``iemocap_data.pkl``: aligned or not) or MMSA's
(``aligned_50.pkl`` / ``unaligned_50.pkl``); nothing is downloaded. The file is
read and checked first (a clear error naming it and the split or key, before
anything is compiled), then ``python -m modalimmune_jax.compare`` runs every
built-in method over the seeds on ``experiments/configs/<data>.py``: each
method's tuning budget on the valid split, every seed on the test split, under
the config's protocol (drop-one and keep-one removals, random missing rates,
frame rates, noise). Its ``comparison.{md,json,png}`` are copied to
``OUT/<data>`` (``--out``, default ``experiments/results/real_benchmark``) beside
``real_benchmark.{json,md}``: the field's metrics table (MOSI / MOSEI: Has0 and
Non0 Acc-2 and F1, Acc-5, Acc-7, MAE, Corr; IEMOCAP: accuracy and F1 per
emotion; full and mean missing, mean ± std over seeds), the file's name, size
and SHA-256, and the compare command.

Flags this script does not know are passed to ``compare`` unchanged:
``--config.train.steps=6000``, ``--together``, ``--notune``, or ``--shard=i/N``
to be one of N workers on a shared ``--workdir`` (then ``--collect`` renders;
see ``python -m modalimmune_jax.compare --help``). A rerun resumes, and skips
what is done.

Size: 9 methods x (3 tuning trials + 5 seeds) runs of 3000 steps; on a 2-core CPU
that is hours for MOSI and more for MOSEI: a GPU job, or ``--shard`` over
machines. ``--quick``: the configs' smoke variant (a few steps of a small
model), plain and dropout, seeds 0 and 1, no tuning: what the tests run on
generated files in each layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

from harness import CONFIGS, ROOT, get_config, log, parser, write_results

NAME = "real_benchmark"
DATA = ("mosi", "mosei", "iemocap")
QUICK = {"methods": "plain,dropout", "seeds": "0,1", "extra": ["--notune"]}
COPIED = ("comparison.md", "comparison.json", "comparison.png")


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def check_file(data: str, path: str, quick: bool):
  """Reads and checks ``path`` as ``data`` (the loader's own errors name the
  file, split and key); returns the data set."""
  from modalimmune_jax import build
  if not os.path.isfile(path):
    raise SystemExit(f"error: --file {path}: no such file (give your {data} pickle; "
                     "nothing is downloaded)")
  config = get_config(data, "smoke" if quick else "", overrides={"data.path": path})
  try:
    return build.load_data(config)
  except (ValueError, OSError) as e:  # the loader's messages name the file
    raise SystemExit(f"error: --file: {e}" if path in str(e) else f"error: --file {path}: {e}")


def compare_command(data: str, path: str, methods: str, seeds: str, workdir: str,
                    quick: bool, extra: list[str]) -> list[str]:
  config = os.path.join(CONFIGS, f"{data}.py") + (":smoke" if quick else "")
  return [sys.executable, "-m", "modalimmune_jax.compare", f"--config={config}",
          f"--config.data.path={os.path.abspath(path)}", f"--methods={methods}",
          f"--seeds={seeds}", f"--workdir={workdir}", *extra]


def render(field: dict, seeds: list[int], data: str, file_info: dict,
           command: list[str]) -> list[str]:
  from modalimmune_jax.compare import render_field
  shown = " ".join("python" if c == sys.executable else c for c in command)
  return ([f"Data: `{file_info['name']}` ({file_info['bytes']:,} bytes, SHA-256 "
           f"`{file_info['sha256'][:16]}…`), {data}. The full comparison (tuning, every "
           "condition, paired differences to plain and dropout with 95 % intervals, the "
           "linear specialists): `comparison.md` beside this file, from", "",
           f"    {shown}"] + render_field(field, seeds))


def main(argv=None) -> int:
  p = parser(__doc__.split("\n\n")[0], NAME)
  p.add_argument("--data", required=True, choices=DATA)
  p.add_argument("--file", required=True, help="the benchmark's pickle (MulT or MMSA layout)")
  p.add_argument("--methods", default=None,
                 help="comma-separated (default: every built-in method; --quick: plain,dropout)")
  p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4; --quick: 0,1)")
  p.add_argument("--workdir", default=None,
                 help="compare's work directory (default runs/real_benchmark/<data>)")
  args, extra = p.parse_known_args(argv)
  stray = [a for a in extra if not a.startswith("--")]
  if stray:
    p.error(f"unexpected arguments {stray} (compare's flags are --name=value)")
  from modalimmune_jax import methods as methods_lib
  method_names = args.methods or (QUICK["methods"] if args.quick
                                  else ",".join(methods_lib.BUILTIN))
  seeds = args.seeds or (QUICK["seeds"] if args.quick else "0,1,2,3,4")
  workdir = args.workdir or os.path.join(ROOT, "runs", NAME + ("_quick" if args.quick else ""),
                                         args.data)
  out = os.path.join(args.out, args.data)
  dataset = check_file(args.data, args.file, args.quick)
  log(f"{args.file}: {args.data}, {dataset.task}, modalities {list(dataset.modality_names)}, "
      + ", ".join(f"{k} {len(s.labels)} samples" for k, s in dataset.splits.items()))
  command = compare_command(args.data, args.file, method_names, seeds, workdir, args.quick,
                            (QUICK["extra"] if args.quick else []) + extra)
  log("running " + " ".join(command[1:]))
  code = subprocess.call(command, cwd=ROOT)
  if code != 0:
    log(f"compare exited {code}; rerun this command to resume")
    return code
  if any(a.startswith("--shard") for a in extra):
    log("a shard's runs are done; render with the same command and --collect")
    return 0
  with open(os.path.join(workdir, "comparison.json")) as f:
    comparison = json.load(f)
  os.makedirs(out, exist_ok=True)
  for name in COPIED:
    shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  seed_list = [int(s) for s in seeds.split(",")]
  field = comparison["field"]
  file_info = {"name": os.path.basename(args.file), "bytes": os.path.getsize(args.file),
               "sha256": sha256(args.file)}
  record = {"data": args.data, "file": file_info, "compare_command": command[1:],
            "workdir": workdir, "methods": method_names.split(","), "field": field,
            "headline_metric": comparison["metric"]}
  write_results(out, NAME, record, render(field, seed_list, args.data, file_info, command),
                title=f"{args.data}: the comparison in the field's metrics",
                seeds=seed_list, quick=args.quick)
  return 0


if __name__ == "__main__":
  sys.exit(main())
