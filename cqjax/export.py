"""Export a `QuantizedModel` as an Orbax checkpoint and load it back in another process.

Layout of an export directory (the directory appears only once complete: it is written under a
temporary name and renamed):

  cqjax_export.json   format version, model config, activation quantizer, online-R4 flag, settings
  arrays/, tree.json  `cqjax.checkpoint.save_tree` of {"params": ..., "r1": ...}: Orbax arrays (a
                      codebook kernel as {"packed": uint8 codes, "centroids": ...}), each codebook's
                      bits and d_in, and a manifest (shape, dtype, CRC-32) checked on load
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

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig
from cqjax.checkpoint import atomic_dir, load_tree, read_json, write_tree
from cqjax.codebook import refuse_laid_out
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.quantize import QuantizedModel

FORMAT = "cqjax-quantized"
FORMAT_VERSION = 1
META_FILE = "cqjax_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json")


def export_quantized(path: str, model: QuantizedModel, tokenizer_dir: str | None = None,
                     settings: dict | None = None, overwrite: bool = False) -> str:
  """Writes `model` to the directory `path` (atomically); returns the absolute path.

  settings: free-form JSON (e.g. the QuantizeConfig or run config) recorded in the metadata.
  """
  path = os.path.abspath(path)
  refuse_laid_out(model.params, "export_quantized")
  if os.path.exists(path) and not overwrite:
    raise CqjaxError(f"{path}: already exists (pass overwrite=True to replace it)")
  r1 = np.zeros((0, 0), np.float32) if model.r1 is None else np.asarray(model.r1)
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
          "model_config": dataclasses.asdict(model.config),
          "act_quant": None if model.act_quant is None else dataclasses.asdict(model.act_quant),
          "online_down_hadamard": model.online_down_hadamard, "has_r1": model.r1 is not None,
          "history": model.history, "settings": settings or {}}
  with atomic_dir(path) as tmp:
    write_tree(tmp, {"params": model.params, "r1": r1})
    if tokenizer_dir is not None:
      copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, f))]
      if not copied:
        raise CqjaxError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
      for f in copied:
        shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=1)
  return path


def _read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isdir(path):
    raise CqjaxError(f"{path}: export directory not found")
  meta = read_json(meta_path, f"{path} is not a cqjax export (or was not written completely)")
  if meta.get("format") != FORMAT:
    raise CqjaxError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CqjaxError(f"{meta_path}: format version {meta.get('format_version')} is not supported "
                     f"(this cqjax reads version {FORMAT_VERSION})")
  return meta


def load_quantized(path: str, verify: bool = True) -> QuantizedModel:
  """An export written by `export_quantized` -> the `QuantizedModel` (arrays on the default
  device). verify: check every array's shape, dtype and CRC-32 against the manifest."""
  path = os.path.abspath(path)
  meta = _read_meta(path)
  tree, _ = load_tree(path, verify)
  cfg_dict = dict(meta["model_config"])
  cfg_dict["dense_layers"] = tuple(cfg_dict.get("dense_layers", ()))
  act = None if meta["act_quant"] is None else ActQuantConfig(**meta["act_quant"])
  params = jax.tree_util.tree_map(jnp.asarray, tree["params"])
  r1 = np.asarray(tree["r1"]) if meta["has_r1"] else None
  return QuantizedModel(ModelConfig(**cfg_dict), params, act, meta["online_down_hadamard"], r1,
                        meta.get("history", {}))
