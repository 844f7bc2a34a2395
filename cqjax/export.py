"""Export a `QuantizedModel` as an Orbax checkpoint and load it back in another process.

Layout of an export directory (the directory appears only once complete: it is written under a
temporary name and renamed):

  cqjax_export.json   format version, model config, activation quantizer, online-R4 flag, each
                      codebook kernel's bits and d_in, and a manifest (shape, dtype, CRC-32) of
                      every array
  arrays/             Orbax checkpoint of {"params": ..., "r1": ...}; a codebook kernel is
                      stored as {"packed": uint8 codes, "centroids": ...}
  tokenizer files     copied from `tokenizer_dir`, so `cqjax.load_tokenizer(path)` reads them

R1, R2 and POG's permutations are already fused into the stored weights (the function they
preserve needs nothing at run time); R1 is kept for users who map activations back, and R4 is the
one transform applied online (`online_down_hadamard`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig
from cqjax.codebook import CodebookWeight
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.quantize import QuantizedModel

FORMAT = "cqjax-quantized"
FORMAT_VERSION = 1
META_FILE = "cqjax_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def _is_codebook(x) -> bool:
  return isinstance(x, CodebookWeight)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _to_storable(params) -> tuple[dict, dict]:
  """params with CodebookWeight leaves -> (nested dicts of arrays, {path: {bits, d_in}})."""
  codebooks = {}

  def convert(path, x):
    if _is_codebook(x):
      codebooks[_path_str(path)] = {"bits": x.bits, "d_in": x.d_in}
      return {"packed": x.packed, "centroids": x.centroids}
    return x

  return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_codebook), codebooks


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
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  out = {}
  for path, leaf in leaves:
    a = np.asarray(leaf)
    out[_path_str(path)] = {"shape": list(a.shape), "dtype": str(a.dtype),
                            "crc32": zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)}
  return out


def export_quantized(path: str, model: QuantizedModel, tokenizer_dir: str | None = None,
                     settings: dict | None = None, overwrite: bool = False) -> str:
  """Writes `model` to the directory `path` (atomically); returns the absolute path.

  settings: free-form JSON (e.g. the QuantizeConfig or run config) recorded in the metadata.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise CqjaxError(f"{path}: already exists (pass overwrite=True to replace it)")
  storable, codebooks = _to_storable(model.params)
  tree = {"params": storable, "r1": np.zeros((0, 0), np.float32) if model.r1 is None else np.asarray(model.r1)}
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
          "model_config": dataclasses.asdict(model.config),
          "act_quant": None if model.act_quant is None else dataclasses.asdict(model.act_quant),
          "online_down_hadamard": model.online_down_hadamard, "has_r1": model.r1 is not None,
          "codebooks": codebooks, "manifest": _manifest(tree), "settings": settings or {}}
  tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(os.path.join(tmp, "arrays"), jax.tree_util.tree_map(np.asarray, tree))
    if tokenizer_dir is not None:
      copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, f))]
      if not copied:
        raise CqjaxError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
      for f in copied:
        shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
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
  return path


def _read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isdir(path):
    raise CqjaxError(f"{path}: export directory not found")
  if not os.path.exists(meta_path):
    raise CqjaxError(f"{meta_path}: missing; {path} is not a cqjax export (or was not written completely)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CqjaxError(f"{meta_path}: corrupt metadata ({e})") from None
  if meta.get("format") != FORMAT:
    raise CqjaxError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CqjaxError(f"{meta_path}: format version {meta.get('format_version')} is not supported "
                     f"(this cqjax reads version {FORMAT_VERSION})")
  return meta


def load_quantized(path: str, verify: bool = True) -> QuantizedModel:
  """An export written by `export_quantized` -> the `QuantizedModel` (arrays on the default
  device). verify: check every array's shape, dtype and CRC-32 against the manifest."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  meta = _read_meta(path)
  arrays = os.path.join(path, "arrays")
  try:
    tree = ocp.PyTreeCheckpointer().restore(arrays)
  except Exception as e:  # Orbax / tensorstore raise many types for missing or truncated files.
    raise CqjaxError(f"{arrays}: cannot read the arrays ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
  if verify:
    got = _manifest(tree)
    want = meta["manifest"]
    if set(got) != set(want):
      raise CqjaxError(f"{arrays}: arrays {sorted(set(want) ^ set(got))[:5]} missing or unexpected")
    for name, w in want.items():
      if got[name] != w:
        raise CqjaxError(f"{arrays}: array {name} is corrupt (expected shape {w['shape']} {w['dtype']}, "
                         f"crc {w['crc32']}; read {got[name]['shape']} {got[name]['dtype']}, crc {got[name]['crc32']})")
  cfg_dict = dict(meta["model_config"])
  cfg_dict["dense_layers"] = tuple(cfg_dict.get("dense_layers", ()))
  cfg = ModelConfig(**cfg_dict)
  act = None if meta["act_quant"] is None else ActQuantConfig(**meta["act_quant"])
  params = jax.tree_util.tree_map(jnp.asarray, _from_storable(tree["params"], meta["codebooks"]))
  r1 = np.asarray(tree["r1"]) if meta["has_r1"] else None
  return QuantizedModel(cfg, params, act, meta["online_down_hadamard"], r1)
