"""experiments/configs/METHODS.md documents every method's meta-parameters: it is
generated from the methods' own settings and specs (experiments/methods_table.py),
and the committed file is exactly what the generator writes, so a key added,
removed, re-defaulted, retuned or set differently in a data set's config without
regenerating the table fails here. Every row names its source."""

from modalimmune_jax import methods, schema
from modalimmune_jax.config import base_config, flatten
from tests.helpers import load_script

table = load_script("methods_table")


def test_methods_md_is_what_the_generator_writes():
  with open(table.PATH) as f:
    committed = f.read()
  assert committed == table.render(), (
      "experiments/configs/METHODS.md is stale: run python experiments/methods_table.py")


def test_every_key_and_every_tuned_key_has_a_row_with_a_source():
  text = table.render()
  rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines()
          if line.startswith("| `")}
  method_keys = {k for k in flatten(base_config()) if k.startswith("method.")
                 and k != "method.name"}
  builtin = [methods.get(n) for n in methods.BUILTIN]
  method_keys = {k for k in method_keys  # shared keys and the built-in methods' sections
                 if len(k.split(".")) == 2 or k.split(".")[1] in methods.BUILTIN}
  tuned = {k for spec in builtin for trial in spec.search for k in trial}
  assert method_keys | tuned <= rows
  assert not table.undocumented(), "rows without a source word"
  for spec in builtin:
    for key, rule in schema.rules(spec.settings).items():
      assert rule.doc, f"method.{spec.name}.{key} has no source"


def test_the_check_fails_on_a_changed_default(tmp_path, monkeypatch):
  stale = tmp_path / "METHODS.md"
  stale.write_text(table.render().replace("| `method.dropout.rate` | `0.3` |",
                                          "| `method.dropout.rate` | `0.4` |"))
  monkeypatch.setattr(table, "PATH", str(stale))
  assert table.main(["--check"]) == 1
  stale.write_text(table.render())
  assert table.main(["--check"]) == 0
