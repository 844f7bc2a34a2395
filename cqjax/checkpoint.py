"""Atomic, verified Orbax checkpoints of parameter pytrees (CodebookWeight leaves included).

`save_tree(path, tree, meta)` writes `path/` under a temporary name and renames it, so `path`
exists only once complete: a process killed while saving leaves the previous state. Beside the
Orbax arrays, `tree.json` records each codebook kernel's static fields and a manifest (shape,
dtype, CRC-32) that `load_tree` checks, so damaged files raise one clear error instead of
returning a silently wrong model. Used by the export and by the resumable pipeline stages.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import zlib

import jax
import numpy as np

from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError
from cqjax.param_paths import get_path, set_path

TREE_FILE = "tree.json"


def _is_codebook(x) -> bool:
  return isinstance(x, CodebookWeight)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _to_storable(tree) -> tuple[dict, dict]:
  """CodebookWeight leaves -> {"packed", "centroids"} dicts; returns (tree, {path: {bits, d_in}})."""
  codebooks = {}

  def convert(path, x):
    if _is_codebook(x):
      codebooks[_path_str(path)] = {"bits": x.bits, "d_in": x.d_in}
      return {"packed": np.asarray(x.packed), "centroids": np.asarray(x.centroids)}
    return np.asarray(x)

  return jax.tree_util.tree_map_with_path(convert, tree, is_leaf=_is_codebook), codebooks


def _from_storable(tree: dict, codebooks: dict) -> dict:
  for path, meta in codebooks.items():
    keys = tuple(path.split("/"))
    stored = get_path(tree, keys)
    tree = set_path(tree, keys, CodebookWeight(stored["packed"], stored["centroids"], meta["bits"], meta["d_in"]))
  return tree


def array_crc32(a) -> int:
  """CRC-32 of an array's bytes (C order)."""
  return zlib.crc32(np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8).data)


def _manifest(tree) -> dict:
  return {_path_str(path): {"shape": list(np.shape(leaf)), "dtype": str(np.asarray(leaf).dtype),
                            "crc32": array_crc32(leaf)}
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def write_text_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def settings_differences(old, new, old_label: str, prefix: str = "") -> list[str]:
  """'key: <old_label> A, now B' for every (nested) setting that differs between two JSON dicts."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new))
            for d in settings_differences(old.get(k), new.get(k), old_label, f"{prefix}{k}.")]
  return [] if old == new else [f"{prefix.rstrip('.')}: {old_label} {old!r}, now {new!r}"]


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields a temporary directory beside `path`; on success it replaces `path` (the old one is
  removed only after the rename), on any error it is deleted and `path` is left as it was."""
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(path):
      old = f"{path}.old-{uuid.uuid4().hex[:8]}"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_tree(directory: str, tree, meta: dict | None = None) -> None:
  """Writes tree (+ meta) into the existing empty-ish `directory` (no atomicity of its own)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  storable, codebooks = _to_storable(tree)
  ocp.PyTreeCheckpointer().save(os.path.join(directory, "arrays"), storable)
  with open(os.path.join(directory, TREE_FILE), "w") as f:
    json.dump({"codebooks": codebooks, "manifest": _manifest(storable), "meta": meta or {}}, f, indent=1)


def save_tree(path: str, tree, meta: dict | None = None) -> None:
  """Atomically (re)writes `path/` with the pytree and a JSON-able `meta` dict."""
  with atomic_dir(os.path.abspath(path)) as tmp:
    write_tree(tmp, tree, meta)


def read_json(path: str, missing: str) -> dict:
  """A metadata file; `missing` says what its absence means."""
  if not os.path.exists(path):
    raise CqjaxError(f"{path}: missing; {missing}")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CqjaxError(f"{path}: corrupt metadata ({e})") from None


def load_tree(path: str, verify: bool = True) -> tuple[dict, dict]:
  """`path/` written by `save_tree` / `write_tree` -> (pytree of numpy arrays, meta)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  info = read_json(os.path.join(path, TREE_FILE), f"{path} was not written completely")
  arrays = os.path.join(path, "arrays")
  try:
    tree = ocp.PyTreeCheckpointer().restore(arrays)
  except Exception as e:  # Orbax / tensorstore raise many types for missing or truncated files.
    raise CqjaxError(f"{arrays}: cannot read the arrays ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if verify:
    got, want = _manifest(tree), info["manifest"]
    if set(got) != set(want):
      raise CqjaxError(f"{arrays}: arrays {sorted(set(want) ^ set(got))[:5]} missing or unexpected")
    for name, w in want.items():
      if got[name] != w:
        raise CqjaxError(f"{arrays}: array {name} is corrupt (expected shape {w['shape']} {w['dtype']}, "
                         f"crc {w['crc32']}; read {got[name]['shape']} {got[name]['dtype']}, crc {got[name]['crc32']})")
  return _from_storable(tree, info["codebooks"]), info["meta"]
