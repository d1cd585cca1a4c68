"""experiments/configs/METHODS.md documents every method's meta-parameters: every
key under ``config.method`` and every key ``compare.SEARCH`` tunes has a row, no
row is stale, and each row's default, per-data-set values, tuned values and
source kind agree with the code."""

import ast
import os
import re

from modalimmune_jax.config import base_config, flatten
from tests.helpers import ROOT, get_config

TABLE = os.path.join(ROOT, "experiments", "configs", "METHODS.md")
COLUMNS = ("key", "default", "synthetic", "mfeat", "mosi, mosei, iemocap", "tuned", "source")
DATASETS = {"synthetic": ("synthetic",), "mfeat": ("mfeat",),
            "mosi, mosei, iemocap": ("mosi", "mosei", "iemocap")}
SOURCES = ("code", "paper", "reimpl.", "METHOD.md", "ours")
NOT_META = ("method.name",)  # which method runs, not a meta-parameter of one


def _rows() -> dict[str, dict]:
  """key -> {column: cell, "section": method}; duplicate rows are an error."""
  rows, section = {}, None
  with open(TABLE) as f:
    for line in f:
      heading = re.match(r"^## `?(\w+)`?\s*$", line)
      if heading:
        section = heading.group(1)
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if not line.startswith("| `") or len(cells) != len(COLUMNS):
        assert not line.startswith("| `"), f"malformed row: {line!r}"
        continue
      row = dict(zip(COLUMNS, cells), section=section)
      key = row["key"].strip("`")
      assert key not in rows, f"{key} has two rows"
      rows[key] = row
  return rows


def _literal(cell: str):
  value = ast.literal_eval(cell.strip("`"))
  return tuple(value) if isinstance(value, list) else value


def _same(a, b) -> bool:
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  return norm(a) == norm(b)


def test_every_method_key_has_a_row_in_its_method_section_and_none_is_stale():
  from modalimmune_jax.compare import SEARCH
  rows = _rows()
  known = flatten(base_config())
  method_keys = {k for k in known if k.startswith("method.") and k not in NOT_META}
  tuned = {k for trials in SEARCH.values() for t in trials for k in t}
  missing = sorted((method_keys | tuned) - set(rows))
  assert not missing, f"METHODS.md lacks rows for {missing}"
  stale = sorted(set(rows) - set(known))
  assert not stale, f"METHODS.md documents keys the schema no longer has: {stale}"
  for method, trials in SEARCH.items():
    for key in {k for t in trials for k in t}:
      assert rows[key]["section"] == method, (
          f"compare.SEARCH[{method!r}] tunes {key}, documented in section {rows[key]['section']!r}")
  for key, row in rows.items():
    parts = key.split(".")
    if key.startswith("method.") and len(parts) > 2:
      assert row["section"] == parts[1], f"{key} is in section {row['section']!r}"
    assert row["source"].split(" ")[0].rstrip(":") in SOURCES, (
        f"{key}: the source must start with one of {SOURCES}, got {row['source']!r}")


def test_documented_values_match_the_schema_the_data_set_configs_and_the_search():
  from modalimmune_jax.compare import SEARCH
  rows = _rows()
  default = flatten(base_config())
  configs = {name: flatten(get_config(name, "")) for names in DATASETS.values()
             for name in names}
  for key, row in rows.items():
    assert _same(_literal(row["default"]), default[key]), (
        f"{key}: METHODS.md says default {row['default']}, base_config has {default[key]!r}")
    for column, names in DATASETS.items():
      expect = default[key] if not row[column] else _literal(row[column])
      for name in names:
        assert _same(configs[name][key], expect), (
            f"{key}: METHODS.md says {row[column] or 'the default'} for {name}, "
            f"experiments/configs/{name}.py has {configs[name][key]!r}")
    trials = SEARCH.get(row["section"], [])
    searched = list(dict.fromkeys(t[key] for t in trials if key in t))
    written = list(_literal("(" + row["tuned"].strip("`") + ",)")) if row["tuned"] else []
    assert len(written) == len(searched) and set(written) == set(searched), (
        f"{key}: METHODS.md says tuned over {written}, compare.SEARCH[{row['section']!r}] "
        f"tries {searched}")
