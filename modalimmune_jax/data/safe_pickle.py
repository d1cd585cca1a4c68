"""A pickle loader that rebuilds data and nothing else.

``pickle.load`` calls whatever the file names, so a downloaded benchmark file
can run code. :func:`load` reads the same files (the MulT and MMSA layouts, from
Python 2 or 3, numpy 1.x or 2.x, any protocol) but allows only what arrays need:
a file naming any other function or class is a :class:`DataError` naming the
file and the refused name, raised before anything from the file runs.

Allowed globals, each through a small checking stand-in (never numpy's own
reconstructor):

* ``numpy.core.multiarray._reconstruct`` (numpy 1.x) and
  ``numpy._core.multiarray._reconstruct`` (2.x): every pickled ndarray; with
  ``numpy.ndarray``, its only argument.
* ``numpy.dtype``: every array's and scalar's dtype. Booleans, integers,
  floats, complex, bytes (``S``), unicode (``U``) and object dtypes only.
* ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: numpy
  scalars (``np.float32(1.5)``, ``np.int64`` lengths).
* ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``:
  arrays in protocol 5 files.
* ``_codecs.encode`` (latin-1 only) and ``builtins.bytes`` (empty only): bytes
  in protocol 0-2 files (Python 3 writes them as calls).

Before numpy sees an array's state, the state is checked: a shape of
non-negative ints, a data length that matches shape and dtype, and for object
arrays a list of exactly that many numbers, strings or bytes. numpy itself
trusts an object array's shape and reads past the list (a segfault): a corrupt
file is a :class:`DataError` here instead.

Example:
  >>> data = load("data/mosi_data.pkl")
  >>> data["train"]["audio"].shape
  (1284, 50, 5)
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from typing import Any, BinaryIO

import numpy as np

from modalimmune_jax.data.core import DataError

__all__ = ["load", "loads", "ALLOWED"]

_WHY = "a data file may only hold arrays, numbers, strings, lists, tuples and dicts"
_PLAIN = (str, bytes, int, float, bool, type(None))
_DTYPE = re.compile(r"(b1|[iu][1248]|f(2|4|8|12|16)|c(8|16|24|32)|O[48]|[SU]\d*)\Z")
_NDARRAY = object()  # what numpy.ndarray stands for: _reconstruct's first argument


class _Corrupt(Exception):
  """An array or dtype whose state numpy must not see."""


class _Dtype:
  """A pickled ``numpy.dtype`` until its state is checked."""
  __slots__ = ("dtype",)

  def __init__(self, spec: Any, align: Any = False, copy: Any = True):
    del align, copy
    if isinstance(spec, bytes):
      spec = spec.decode("latin1")
    if not isinstance(spec, str) or not _DTYPE.match(spec):
      raise _Corrupt(f"unsupported dtype {spec!r} (numbers, strings and objects only)")
    self.dtype = np.dtype(spec)

  def __setstate__(self, state: Any):
    if not isinstance(state, tuple) or len(state) not in (8, 9):
      raise _Corrupt(f"bad dtype state {state!r:.80}")
    order, sub, names, fields, size = state[1:6]
    if sub is not None or names is not None or fields is not None or any(state[8:]):
      raise _Corrupt("structured dtypes and dtype metadata are not supported")
    if order not in ("<", ">", "|", "="):
      raise _Corrupt(f"bad byte order {order!r}")
    kind = self.dtype.kind
    if kind in "SU":
      if not isinstance(size, int) or size < 0 or (kind == "U" and size % 4):
        raise _Corrupt(f"bad {kind} item size {size!r}")
      self.dtype = np.dtype(f"{kind}{size // 4 if kind == 'U' else size}")
    if self.dtype.byteorder != "|" and order in "<>":
      self.dtype = self.dtype.newbyteorder(order)


def _dtype(x: Any) -> np.dtype:
  if not isinstance(x, _Dtype):
    raise _Corrupt(f"expected a dtype, got {type(x).__name__}")
  return x.dtype


def _raw(data: Any) -> bytes | bytearray:
  if isinstance(data, str):  # Python 2 str, read as latin-1 (as numpy does)
    return data.encode("latin1")
  if not isinstance(data, (bytes, bytearray)):
    raise _Corrupt(f"array data is a {type(data).__name__}")
  return data


def _size(shape: Any, itemsize: int) -> int:
  if (not isinstance(shape, tuple) or len(shape) > 32
      or not all(type(d) is int and d >= 0 for d in shape)):
    raise _Corrupt(f"bad array shape {shape!r:.80}")
  if math.prod(d for d in shape if d) * max(itemsize, 1) >= 2**62:
    raise _Corrupt(f"array shape {shape} is too large")
  return math.prod(shape)


class _Array:
  """A pickled ndarray until its state is checked and handed to numpy."""
  __slots__ = ("array",)

  def __init__(self, array: np.ndarray | None = None):
    self.array = array

  def __setstate__(self, state: Any):
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise _Corrupt(f"bad array state {state!r:.80}")
    shape, dtype, fortran, data = state[-4:]
    dtype = _dtype(dtype)
    n = _size(shape, dtype.itemsize)
    if not isinstance(fortran, (bool, int)):
      raise _Corrupt(f"bad array order flag {fortran!r:.40}")
    if dtype.hasobject:
      if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else f"a {type(data).__name__}"
        raise _Corrupt(f"an object array of shape {shape} needs {n} elements, the file "
                       f"gives {got}")
      bad = [type(v).__name__ for v in data if type(v) not in _PLAIN
             and not isinstance(v, np.generic)]
      if bad:
        raise _Corrupt(f"an object array holds a {bad[0]} (numbers, strings, bytes only)")
    else:
      data = _raw(data)
      if len(data) != n * dtype.itemsize:
        raise _Corrupt(f"an array of shape {shape} and dtype {dtype} needs "
                       f"{n * dtype.itemsize} bytes, the file gives {len(data)}")
    self.array = np.empty(0, np.uint8)
    self.array.__setstate__((shape, dtype, bool(fortran), data))


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
  if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
    raise _Corrupt("bad array reconstruction arguments")
  return _Array()


def _scalar(dtype: Any, data: Any = None) -> np.generic:
  dtype = _dtype(dtype)
  data = _raw(data)
  if dtype.hasobject or len(data) != dtype.itemsize:
    raise _Corrupt(f"a {dtype} scalar needs {dtype.itemsize} bytes, the file gives {len(data)}")
  return np.frombuffer(data, dtype)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> _Array:
  dtype = _dtype(dtype)
  buf = _raw(buf)
  n = _size(shape, dtype.itemsize)
  if dtype.hasobject or order not in ("C", "F") or len(buf) != n * dtype.itemsize:
    raise _Corrupt(f"bad protocol-5 array (shape {shape}, dtype {dtype}, {len(buf)} bytes)")
  return _Array(np.frombuffer(buf, dtype).reshape(shape, order=order))


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Corrupt("_codecs.encode is allowed for latin-1 bytes only")
  return text.encode("latin1")


def _bytes(*args: Any) -> bytes:
  if args:
    raise _Corrupt("builtins.bytes is allowed for empty bytes only")
  return b""


class _Call:
  """An allowed global: callable, but the file cannot change it (a BUILD on a
  plain function or class would set its attributes for every later load)."""
  __slots__ = ("fn",)

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args: Any) -> Any:
    return self.fn(*args)

  def __setstate__(self, state: Any):
    raise _Corrupt(f"the file sets the state of {self.fn.__name__}")


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Call(_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Call(_reconstruct),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Call(_Dtype),
    ("numpy.core.multiarray", "scalar"): _Call(_scalar),
    ("numpy._core.multiarray", "scalar"): _Call(_scalar),
    ("numpy.core.numeric", "_frombuffer"): _Call(_frombuffer),
    ("numpy._core.numeric", "_frombuffer"): _Call(_frombuffer),
    ("_codecs", "encode"): _Call(_encode),
    ("builtins", "bytes"): _Call(_bytes),
    ("__builtin__", "bytes"): _Call(_bytes),  # protocol 0-2 spelling
}


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Python's own unpickler with :data:`ALLOWED` as its only globals.

  The pure-Python one, not the C one: its memo is a dict. The C unpickler
  grows a table to the largest memo index the file names, so one corrupt
  byte (``LONG_BINPUT 0xF0000000``) fills 64 GB and the kernel kills the
  process. On a 200 MB MulT file it costs ~20 ms more.
  """

  def __init__(self, file: BinaryIO, name: str, encoding: str):
    super().__init__(file, encoding=encoding)
    self.name = name

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED[module, name]
    except (KeyError, TypeError):
      qualified = repr(f"{module}.{name}")  # quoted, a newline escaped
      raise DataError(f"{self.name}: refuses to load {qualified}: {_WHY}") from None


def _finish(x: Any, seen: dict) -> Any:
  """``x`` with every checked stand-in replaced by its array or dtype."""
  if type(x) in _PLAIN or isinstance(x, (np.ndarray, np.generic)):
    return x
  if id(x) in seen:
    return seen[id(x)]
  if isinstance(x, _Array):
    if x.array is None:
      raise _Corrupt("an array without its data")
    out = x.array
  elif isinstance(x, _Dtype):
    out = x.dtype
  elif type(x) is list:
    seen[id(x)] = x  # before the items: a list may hold itself
    x[:] = [_finish(v, seen) for v in x]
    return x
  elif type(x) is dict:
    out = {_finish(k, seen): _finish(v, seen) for k, v in x.items()}
  elif type(x) in (tuple, set, frozenset):
    out = type(x)(_finish(v, seen) for v in x)
  elif type(x) is bytearray:
    out = x
  else:
    raise _Corrupt(f"unexpected {type(x).__name__}")
  seen[id(x)] = out
  return out


def _load(f: BinaryIO, name: str) -> Any:
  try:
    start = f.tell()
    try:
      obj = _Unpickler(f, name, "ASCII").load()
    except UnicodeDecodeError:  # written by Python 2
      f.seek(start)
      obj = _Unpickler(f, name, "latin1").load()
    return _finish(obj, {})
  except DataError:
    raise
  except _Corrupt as e:
    raise DataError(f"{name}: cannot read the pickle (truncated or corrupt?): {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # A corrupt stream can fail in any way: EOFError, UnpicklingError,
    # OverflowError (impossible frame length), SystemError and RuntimeError
    # (flipped opcodes), KeyError, MemoryError, RecursionError, ...
    why = " ".join(str(e).split())  # one line
    raise DataError(f"{name}: cannot read the pickle (truncated or corrupt?): "
                    f"{type(e).__name__}: {why:.300}") from e


def load(source: str | os.PathLike | BinaryIO) -> Any:
  """Unpickles a data file (a path or a seekable binary file), allowing only data.

  Raises:
    DataError: naming the file, for a missing, corrupt or refused file (any
      global outside :data:`ALLOWED`: nothing from the file has run).

  Example:
    >>> load("mosi_data.pkl")["train"]["text"].dtype
    dtype('float32')
  """
  if hasattr(source, "read"):
    return _load(source, str(getattr(source, "name", "<stream>")))
  name = os.fspath(source)
  if not os.path.isfile(name):
    raise DataError(f"{name}: no such file")
  with open(name, "rb") as f:
    return _load(f, name)


def loads(blob: bytes, name: str = "<bytes>") -> Any:
  """:func:`load` of a pickle held in memory; ``name`` is for messages.

  Example:
    >>> loads(pickle.dumps({"x": np.zeros(3)}))["x"]
    array([0., 0., 0.])
  """
  return _load(io.BytesIO(blob), name)
