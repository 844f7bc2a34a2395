"""Atomic, verified Orbax checkpoints of parameter pytrees (CodebookWeight leaves included).

`save_tree(path, tree, meta)` writes `path/` under a temporary name and renames it, so `path`
exists only once complete: a process killed while saving leaves the previous state. Beside the
Orbax arrays, `tree.json` records each codebook kernel's static fields and a manifest (shape,
dtype, CRC-32) that `load_tree` checks, so damaged files raise one clear error instead of
returning a silently wrong model. Used by the export and by the resumable pipeline stages.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib

import jax
import numpy as np

from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError

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
  out = dict(tree)
  for path, meta in codebooks.items():
    keys = path.split("/")
    node = out
    for k in keys[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    stored = node[keys[-1]]
    node[keys[-1]] = CodebookWeight(stored["packed"], stored["centroids"], meta["bits"], meta["d_in"])
  return out


def _manifest(tree) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.ascontiguousarray(np.asarray(leaf))
    out[_path_str(path)] = {"shape": list(a.shape), "dtype": str(a.dtype),
                            "crc32": zlib.crc32(a.reshape(-1).view(np.uint8).data)}
  return out


def replace_dir_atomic(tmp: str, path: str) -> None:
  """Moves the finished directory `tmp` to `path`, replacing what was there."""
  if os.path.exists(path):
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old)
  else:
    os.rename(tmp, path)


def write_tree(directory: str, tree, meta: dict | None = None) -> None:
  """Writes tree (+ meta) into the existing empty-ish `directory` (no atomicity of its own)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  storable, codebooks = _to_storable(tree)
  ocp.PyTreeCheckpointer().save(os.path.join(directory, "arrays"), storable)
  with open(os.path.join(directory, TREE_FILE), "w") as f:
    json.dump({"codebooks": codebooks, "manifest": _manifest(storable), "meta": meta or {}}, f, indent=1)


def save_tree(path: str, tree, meta: dict | None = None) -> None:
  """Atomically (re)writes `path/` with the pytree and a JSON-able `meta` dict."""
  path = os.path.abspath(path)
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    write_tree(tmp, tree, meta)
    replace_dir_atomic(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


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
