"""Text for calibration and evaluation: a file path or a `datasets` dataset, tokenized whole.

Protocol of the PTQ literature (GPTQ, QuaRot, SpinQuant): the whole text is tokenized once;
evaluation cuts it into non-overlapping windows, calibration draws random windows with a seed.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from cqjax.errors import CqjaxError


def read_text(source: Any, text_column: str = "text") -> tuple[str, str]:
  """Returns (name, text) for a file path or a `datasets.Dataset` (rows joined with blank lines)."""
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise CqjaxError(f"{path}: text file not found")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    name = os.path.basename(path)
  elif hasattr(source, "column_names"):  # a datasets.Dataset, without importing datasets here
    if text_column not in source.column_names:
      raise CqjaxError(f"dataset has no column {text_column!r} (columns: {source.column_names})")
    text = "\n\n".join(source[text_column])
    name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
  else:
    raise CqjaxError(f"text source must be a file path or a datasets.Dataset, got {type(source).__name__}")
  if not text.strip():
    raise CqjaxError(f"{name}: text is empty")
  return name, text


def tokenize(tokenizer, text: str) -> np.ndarray:
  """The whole text as one int32 token array (the tokenizer's own special tokens included)."""
  return np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int32)


def eval_windows(ids: np.ndarray, seqlen: int, name: str = "text") -> np.ndarray:
  """Non-overlapping windows [n, seqlen]; the tail shorter than seqlen is dropped."""
  n = len(ids) // seqlen
  if n == 0:
    raise CqjaxError(f"{name}: {len(ids)} tokens is shorter than one window of seqlen={seqlen}")
  return ids[: n * seqlen].reshape(n, seqlen)


def sample_windows(ids: np.ndarray, num: int, length: int, seed: int = 0,
                   name: str = "text") -> np.ndarray:
  """`num` random windows [num, length] drawn with `seed` (calibration samples)."""
  if len(ids) <= length:
    raise CqjaxError(f"{name}: {len(ids)} tokens is too short for calibration windows of {length}")
  starts = np.random.default_rng(seed).integers(0, len(ids) - length, size=num)
  return np.stack([ids[s: s + length] for s in starts]).astype(np.int32)


def calibration_windows(source: Any, tokenizer, num: int, length: int, seed: int = 0) -> np.ndarray:
  """Tokenizes `source` (path or dataset) and draws calibration windows [num, length]."""
  name, text = read_text(source)
  return sample_windows(tokenize(tokenizer, text), num, length, seed, name)
