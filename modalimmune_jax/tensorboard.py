"""TensorBoard event files of scalar metrics, without TensorFlow or PyTorch.

:class:`EventWriter` writes through ``tensorboardX`` (a maintained writer that
needs only numpy and protobuf); only process 0 writes. :func:`read_scalars`
reads the files back with ``tensorboardX``'s own protobufs and a small TFRecord
reader (no ``tensorboard`` package needed), e.g. to test what was logged.

Example:
  >>> with EventWriter("runs/mosi") as tb:
  ...   tb.scalars(100, {"loss": 0.5, "valid": {"MAE": 0.9}}, prefix="train/")
  2
  >>> read_scalars("runs/mosi")["train/valid/MAE"]
  [(100, 0.8999999761581421)]
"""

from __future__ import annotations

import glob
import math
import os
import struct
from numbers import Number
from typing import Any, Mapping

import numpy as np

__all__ = ["EventWriter", "read_scalars"]


def _process_index() -> int:
  import jax
  return jax.process_index()


def _flat(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for k, v in values.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _number(v: Any) -> float | None:
  """``v`` as a finite float, or ``None`` (strings, arrays, NaN, ...)."""
  if isinstance(v, str) or v is None:
    return None
  if not isinstance(v, Number):
    a = np.asarray(v) if hasattr(v, "__array__") or isinstance(v, np.generic) else None
    if a is None or a.size != 1 or a.dtype.kind not in "biuf":
      return None
    v = a.reshape(())
  x = float(v)
  return x if math.isfinite(x) else None


class EventWriter:
  """Scalars to TensorBoard event files in ``logdir`` (created on first need).

  Args:
    logdir: the folder (e.g. the run's folder, beside ``metrics.jsonl``).
    enabled: ``False`` writes nothing (the config switch).
    process_index: this process's index; ``None`` asks jax. Only process 0
      writes.
    flush_secs: how often the writer's thread flushes to disk.
    purge_step: a resumed run's first step: TensorBoard (and
      :func:`read_scalars`) then drop what earlier sessions logged at this
      step or later, which the resumed run logs again.

  Example:
    >>> tb = EventWriter("runs/a", enabled=config.tensorboard)
    >>> tb.scalars(step, {"loss": 0.31, "lr": 1e-3}, prefix="train/")
    >>> tb.close()
  """

  def __init__(self, logdir: str, enabled: bool = True, process_index: int | None = None,
               flush_secs: int = 30, purge_step: int | None = None):
    self.logdir = logdir
    self._writer = None
    if enabled and (_process_index() if process_index is None else process_index) == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=logdir, flush_secs=flush_secs, purge_step=purge_step)

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> int:
    """Logs each finite number of ``values`` (nested dicts give ``a/b`` tags)
    at ``step``; skips the rest. Returns how many were written."""
    if self._writer is None:
      return 0
    written = 0
    for tag, v in _flat(values, prefix).items():
      x = _number(v)
      if x is not None:
        self._writer.add_scalar(tag, x, global_step=int(step))
        written += 1
    return written

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc):
    self.close()


def _masked_crc(data: bytes) -> int:
  from tensorboardX.crc32c import crc32c
  x = crc32c(data) & 0xFFFFFFFF
  return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str):
  """The records of a TFRecord file; a truncated last record (a writer still
  writing) ends the file, a bad checksum is a ValueError."""
  with open(path, "rb") as f:
    while True:
      head = f.read(12)
      if len(head) < 12:
        return
      (n,), (head_crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
      if _masked_crc(head[:8]) != head_crc:
        raise ValueError(f"{path}: corrupt record length at byte {f.tell() - 12}")
      body = f.read(n + 4)
      if len(body) < n + 4:
        return
      if _masked_crc(body[:n]) != struct.unpack("<I", body[n:])[0]:
        raise ValueError(f"{path}: corrupt record at byte {f.tell() - n - 16}")
      yield body[:n]


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``tag -> [(step, value), ...]`` from the event files in ``logdir``, in
  file and write order. As TensorBoard does, a session that starts at step
  ``s`` (``purge_step``: a resumed run) drops what was logged before it at
  step ``s`` or later.

  Example:
    >>> read_scalars("runs/a")["train/loss"][:2]
    [(0, 1.25), (10, 0.75)]
  """
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
    for record in _records(path):
      event = Event.FromString(record)
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        out = {tag: [(s, x) for s, x in values if s < event.step]
               for tag, values in out.items()}
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
        elif v.HasField("tensor") and v.tensor.float_val:
          out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
  return out
