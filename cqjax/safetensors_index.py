"""Reads Hugging Face safetensors checkpoints (single file or sharded) lazily through mmap.

numpy's safetensors bindings cannot read bfloat16, and a truncated shard must be reported by
name, so the (simple) format is parsed here: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from cqjax.errors import CqjaxError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
  """One .safetensors file: validated header, tensors as read-only numpy views of an mmap."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CqjaxError(f"{path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", raw)
      if 8 + n > size:
        raise CqjaxError(f"{path}: truncated safetensors file (header says {n} bytes)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise CqjaxError(f"{path}: not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    self._start = 8 + n
    self._entries = header
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if self._start + end > size:
      raise CqjaxError(
          f"{path}: truncated safetensors file ({size} bytes, tensors need {self._start + end})")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

  def keys(self):
    return self._entries.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    e = self._entries[name]
    if e["dtype"] not in _DTYPES:
      raise CqjaxError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
    dtype = np.dtype(_DTYPES[e["dtype"]])
    b, end = e["data_offsets"]
    count = int(np.prod(e["shape"], dtype=np.int64))
    if end - b != count * dtype.itemsize:
      raise CqjaxError(f"{self.path}: tensor {name!r} byte range does not match its shape")
    buf = self._mmap[self._start + b: self._start + end]
    return buf.view(dtype).reshape(e["shape"])


class CheckpointIndex:
  """Maps tensor names to the shard that holds them, for a checkpoint directory."""

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, "model.safetensors.index.json")
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
      for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(directory, shard)):
          raise CqjaxError(f"{os.path.join(directory, shard)}: shard listed in {index_path} is missing")
      self._where = dict(weight_map)
    else:
      shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if not shards:
        raise CqjaxError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
      for shard in shards:
        name = os.path.basename(shard)
        for key in self._open(name).keys():
          self._where[key] = name

  def _open(self, shard: str) -> SafetensorsFile:
    if shard not in self._files:
      self._files[shard] = SafetensorsFile(os.path.join(self.directory, shard))
    return self._files[shard]

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor `name`, checked against `expected_shape` (errors name the file and tensor)."""
    if name not in self._where:
      raise CqjaxError(f"{self.directory}: tensor {name!r} not found in the checkpoint")
    f = self._open(self._where[name])
    if name not in f.keys():
      raise CqjaxError(f"{f.path}: tensor {name!r} listed in the index is missing from the file")
    if expected_shape is not None and f.shape(name) != tuple(expected_shape):
      raise CqjaxError(
          f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}, "
          f"config.json implies {list(expected_shape)}")
    return f.get(name)
