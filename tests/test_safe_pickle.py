"""The data-only pickle loader (issue 20): malicious files are refused before
anything runs, the real layouts load exactly as ``pickle.load`` gives them."""

import builtins
import io
import os
import pickle
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest

from modalimmune_jax import data
from modalimmune_jax.data import DataError, safe_pickle
from tests import fakes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ payloads ----

class _Payload:
  """Creates ``marker`` when unpickled by ``pickle.load``, through ``fn``."""

  def __init__(self, fn, marker):
    self.fn, self.marker = fn, str(marker)

  def __reduce__(self):
    m = self.marker
    if self.fn is os.system:
      return os.system, (f"touch '{m}'",)
    if self.fn is builtins.exec:
      return builtins.exec, (f"open({m!r}, 'w').close()",)
    return self.fn, (["touch", m],)  # subprocess.Popen / check_call


PAYLOADS = {"os.system": os.system, "exec": builtins.exec,
            "subprocess.Popen": subprocess.Popen, "subprocess.check_call": subprocess.check_call}


def _qualname(fn):
  return f"{fn.__module__}.{fn.__name__}"  # os.system is posix.system on Linux


def _place(where, payload):
  """A MulT-shaped file with ``payload`` at the top, as a split, as a key or
  inside a list."""
  if where == "top":
    return payload
  d = {s: fakes.mult_record("mosi", n, np.random.default_rng(0)) for s, n in fakes.SIZES.items()}
  if where == "split":
    d["train"] = payload
  elif where == "key":
    d["valid"]["audio"] = payload
  else:  # a list, deep in the file
    d["test"]["id"] = [b"vid0", [b"clip", payload]]
  return d


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payloads_run_under_plain_pickle(tmp_path, kind):
  """The payloads are real: plain ``pickle.loads`` creates the marker."""
  marker = tmp_path / "ran"
  out = pickle.loads(pickle.dumps(_Payload(PAYLOADS[kind], marker)))
  if isinstance(out, subprocess.Popen):
    out.wait()
  assert marker.exists()


@pytest.mark.parametrize("where", ["top", "split", "key", "list"])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_files_are_refused(tmp_path, kind, where):
  """Refused with a one-line DataError naming the file and the global; the
  marker never appears."""
  fn, marker = PAYLOADS[kind], tmp_path / "ran"
  path = tmp_path / "mosi_data.pkl"
  path.write_bytes(pickle.dumps(_place(where, _Payload(fn, marker))))
  with pytest.raises(DataError) as info:
    data.load_dataset("mosi", path=str(path))
  msg = str(info.value)
  assert msg == (f"{path}: refuses to load '{_qualname(fn)}': a data file may only hold "
                 "arrays, numbers, strings, lists, tuples and dicts")
  assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_files_are_refused_in_every_protocol(tmp_path, kind, protocol):
  fn, marker = PAYLOADS[kind], tmp_path / "ran"
  path = tmp_path / "x.pkl"
  path.write_bytes(pickle.dumps(_place("split", _Payload(fn, marker)), protocol=protocol))
  with pytest.raises(DataError, match="refuses to load") as info:
    safe_pickle.load(str(path))
  assert str(path) in str(info.value) and fn.__name__ in str(info.value)
  assert not marker.exists()


def test_cli_refuses_a_malicious_file(tmp_path):
  """``python -m modalimmune_jax.data describe``: exit 2, one line naming the
  file and the global, nothing ran."""
  marker, path = tmp_path / "ran", tmp_path / "mosi_data.pkl"
  path.write_bytes(pickle.dumps(_place("split", _Payload(os.system, marker))))
  proc = subprocess.run([sys.executable, "-m", "modalimmune_jax.data", "describe", "mosi",
                         f"--path={path}"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(path) in lines[0] and "'posix.system'" in lines[0], proc.stderr
  assert not marker.exists()


def test_allowed_names_cannot_be_changed_by_a_file():
  """A BUILD on an allowed global (which would set the attributes of the
  loader's own functions for every later load) is refused."""
  blob = b"\x80\x02c_codecs\nencode\nN}\x86b."  # BUILD (None, {}) on _codecs.encode
  with pytest.raises(DataError, match="sets the state"):
    safe_pickle.loads(blob)
  assert safe_pickle.loads(pickle.dumps(b"ok", protocol=2)) == b"ok"


@pytest.mark.parametrize("blob, why", [
    (pickle.dumps(np.dtype([("a", "f4")])), "unsupported dtype 'V4'"),
    (pickle.dumps(np.zeros(2, "M8[s]")), "unsupported dtype 'M8'"),
    (pickle.dumps(np.ndarray), "unexpected object"),
])
def test_other_numpy_objects_are_refused(blob, why):
  with pytest.raises(DataError, match=why):
    safe_pickle.loads(blob, name="f.pkl")


# ------------------------------------------------------ real layouts ----

def _assert_same(a, b):
  """Equal values, types, dtypes and array flags, recursively."""
  assert type(a) is type(b), (type(a), type(b))
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      _assert_same(x, y)
  elif isinstance(a, np.ndarray):
    assert (a.dtype, a.shape, a.flags.writeable, a.flags.c_contiguous) == \
        (b.dtype, b.shape, b.flags.writeable, b.flags.c_contiguous)
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b


WRITERS = {
    "mosi_data.pkl": lambda p: fakes.write_mult(p, "mosi"),
    "iemocap_data_noalign.pkl": lambda p: fakes.write_mult(p, "iemocap", aligned=False),
    "aligned_50.pkl": lambda p: fakes.write_mmsa(p, aligned=True),
    "unaligned_50.pkl": lambda p: fakes.write_mmsa(p, aligned=False),
}


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes bytes as Python 2 ``str`` (BINSTRING), as Python 2 pickles hold them."""
  dispatch = pickle._Pickler.dispatch.copy()  # pylint: disable=protected-access

  def save_bytes(self, obj):
    n = len(obj)
    if n < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
    self.memoize(obj)

  dispatch[bytes] = save_bytes


def _py2_numpy1_dumps(obj):
  """A protocol-2 pickle as Python 2 with numpy 1.x writes it."""
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_layouts_load_exactly(tmp_path, name):
  path = tmp_path / name
  WRITERS[name](str(path))
  with open(path, "rb") as f:
    ref = pickle.load(f)
  _assert_same(safe_pickle.load(str(path)), ref)
  for protocol in (2, 5):
    _assert_same(safe_pickle.loads(pickle.dumps(ref, protocol=protocol)), ref)
  ds = data.load_dataset("iemocap" if name.startswith("iemocap") else "mosi", path=str(path))
  assert ds.splits["train"].num_samples == fakes.SIZES["train"]


@pytest.mark.parametrize("name", ["mosi_data.pkl", "unaligned_50.pkl"])
def test_python2_numpy1_pickles_load(tmp_path, name):
  """Python 2 str payloads (retried as latin-1) and numpy 1.x module names."""
  ref = WRITERS[name](str(tmp_path / name))
  blob = _py2_numpy1_dumps(ref)
  assert b"numpy.core.multiarray" in blob and b"numpy._core" not in blob
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core under numpy 2
    plain = pickle.loads(blob, encoding="latin1")
  (tmp_path / name).write_bytes(blob)
  got = safe_pickle.load(str(tmp_path / name))
  _assert_same(got, plain)
  ds = data.load_dataset("mosi", path=str(tmp_path / name))
  assert ds.splits["test"].num_samples == fakes.SIZES["test"]


def test_values_of_every_kind_round_trip():
  d = {"f4": np.arange(6, dtype=np.float32).reshape(2, 3), "be": np.arange(3, dtype=">f8"),
       "fortran": np.asfortranarray(np.ones((2, 3))), "strided": np.arange(6.0)[::2],
       "empty": np.zeros((0, 4), bool), "c8": np.ones(2, np.complex64),
       "f2": np.ones(3, np.float16), "u1": np.arange(3, dtype=np.uint8),
       "S": np.array([b"x", b"yyy"]), "U": np.array(["x", "yy"]),
       "ids": np.array([[b"v0", b"clip"]], dtype=object),
       "text": np.array(["a", "bb", None, np.float32(1)], dtype=object),
       "scalars": [np.float32(1.5), np.int64(7), np.str_("abc"), np.bool_(True)],
       "plain": [1, 2.5, "x", b"y", b"", None, True, (1, (2,))]}
  d["shared"] = d["f4"]
  for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
    got = safe_pickle.loads(pickle.dumps(d, protocol=protocol))
    _assert_same(got, pickle.loads(pickle.dumps(d, protocol=protocol)))
    assert got["shared"] is got["f4"]


def test_open_file_and_missing_file(tmp_path):
  path = tmp_path / "x.pkl"
  path.write_bytes(pickle.dumps({"a": np.zeros(2)}))
  with open(path, "rb") as f:
    assert safe_pickle.load(f)["a"].shape == (2,)
  with pytest.raises(DataError, match="no such file"):
    safe_pickle.load(str(tmp_path / "missing.pkl"))
