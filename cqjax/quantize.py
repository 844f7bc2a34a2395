"""`quantize`: the whole CodeQuant pipeline as one pure call over a param pytree.

  fold norms -> calibrate -> R1 (learned, Hadamard or none; plus R2 and the online R4 in scope
  `full`) -> optional POG -> K-means codebooks -> optional ACCF fine-tuning

The result carries what the model needs to run the quantized params: the folded config and the
flags (activation quantizer, online Hadamard) that `QuantizedModel.module()` passes to
`MoeCausalLM`. Each step is also a public function of its own module.

With `checkpoint_dir`, each finished step (R1, the K-means codebooks, every ACCF layer) is saved
there atomically; calling again with the same inputs resumes after the last finished step and
returns the same model, and different inputs are refused with the settings that differ.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cqjax.act_quant import ActQuantConfig
from cqjax.calibrate import collect_norm_outputs, collect_norm_outputs_by_layer
from cqjax.checkpoint import array_crc32, load_tree, read_json, save_tree, settings_differences, write_text_atomic
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.finetune_centroids import AccfConfig, finetune_centroids
from cqjax.fold_norms import fold_norms
from cqjax.hadamard import hadamard_matrix
from cqjax.kmeans import column_group, kmeans_quantize
from cqjax.layer_streaming import on_host, to_host
from cqjax.learn_rotation import AosConfig, initial_rotation, learn_rotation
from cqjax.load import Params
from cqjax.model import MoeCausalLM
from cqjax.pog import apply_pog
from cqjax.quantize_weights import SCOPES, quantize_scope, scope_paths
from cqjax.rotate import rotate_params
from cqjax.sharding import shard_params

ROTATIONS = ("learned", "hadamard", "none")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """bits: weight code bits (2^bits centroids); act_bits: 16 = weights only; group_size: -1 for
  one codebook per output row, else column groups (where they divide d_in); pog: permute o_proj
  (and, without R4, down projection) inputs before clustering; accf: None skips fine-tuning;
  accf_samples: fine-tune on the first n calibration windows (0: all)."""

  bits: int = 4
  act_bits: int = 4
  scope: str = "full"
  rotation: str = "learned"
  group_size: int = -1
  pog: bool = False
  aos: AosConfig = AosConfig()
  accf: AccfConfig | None = AccfConfig(lr=1e-3, optimizer="adam")
  accf_samples: int = 0
  calib_batch_size: int = 16
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """Quantized params and what runs them: `module()` is the matching `MoeCausalLM`. history:
  the AOS loss per epoch ("aos") and ACCF block losses per epoch ("accf"), where they ran."""

  config: ModelConfig
  params: Params
  act_quant: ActQuantConfig | None
  online_down_hadamard: bool
  r1: np.ndarray | None
  history: dict = dataclasses.field(default_factory=dict)

  def module(self, dtype=jnp.float32) -> MoeCausalLM:
    return MoeCausalLM(self.config, dtype, act_quant=self.act_quant, online_down_hadamard=self.online_down_hadamard)


def rotate_for_scope(cfg: ModelConfig, folded: Params, r1: np.ndarray | None, scope: str) -> tuple[Params, bool]:
  """Fuses R1 into folded params; in scope `full` also R2 (per value head) and the weight side of
  the online Hadamard R4. Returns (params, whether the model must apply R4 online)."""
  if r1 is None:
    return folded, False
  online = scope == "full"
  return rotate_params(cfg, folded, r1, hadamard_matrix(cfg.value_head_dim) if online else None,
                       online_down_hadamard=online), online


def _check(config: QuantizeConfig, windows: np.ndarray) -> None:
  if config.scope not in SCOPES:
    raise CqjaxError(f"QuantizeConfig.scope must be one of {SCOPES}, got {config.scope!r}")
  if config.rotation not in ROTATIONS:
    raise CqjaxError(f"QuantizeConfig.rotation must be one of {ROTATIONS}, got {config.rotation!r}")
  if config.pog and config.group_size <= 0:
    raise CqjaxError("QuantizeConfig.pog needs column groups: set group_size > 0")
  if windows.ndim != 2 or windows.shape[0] == 0 or not np.issubdtype(windows.dtype, np.integer):
    raise CqjaxError(f"calibration_batches must be integer token windows [n, t], got {windows.dtype}{windows.shape}")


def _fingerprint(config: QuantizeConfig, model_config: ModelConfig, params: Params, windows: np.ndarray) -> dict:
  """What a resumed run must share with the one that wrote the checkpoint."""
  return {"quantize_config": json.loads(json.dumps(dataclasses.asdict(config))),
          "model_config": json.loads(json.dumps(dataclasses.asdict(model_config))),
          "calibration_crc32": array_crc32(windows.astype(np.int64)),
          "calibration_shape": list(windows.shape),
          "embedding_crc32": array_crc32(np.asarray(params["embed"]["embedding"], np.float32))}


def _open_checkpoint(checkpoint_dir: str, fingerprint: dict) -> None:
  os.makedirs(checkpoint_dir, exist_ok=True)
  path = os.path.join(checkpoint_dir, "settings.json")
  if os.path.exists(path):
    diffs = settings_differences(read_json(path, "not a quantize checkpoint"), fingerprint, "checkpoint has")
    if diffs:
      raise CqjaxError(f"{checkpoint_dir}: holds a run with other inputs, refusing to resume ("
                       + "; ".join(diffs[:4]) + "); use another checkpoint_dir or delete it")
    return
  write_text_atomic(path, json.dumps(fingerprint, indent=1))


def _checkpointed(checkpoint_dir: str | None, name: str, compute):
  """compute() once: its pytree is saved under checkpoint_dir/name and read back (as numpy
  arrays of the same dtypes) on resume."""
  if checkpoint_dir is None:
    return compute()
  path = os.path.join(checkpoint_dir, name)
  if os.path.exists(path):
    return load_tree(path)[0]
  tree = compute()
  save_tree(path, tree)
  return tree


def quantize(params: Params, model_config: ModelConfig, calibration_batches, config: QuantizeConfig = QuantizeConfig(),
             dtype=jnp.float32, progress: bool = True, checkpoint_dir: str | None = None,
             mesh: jax.sharding.Mesh | None = None) -> QuantizedModel:
  """params of `model_config` (as `cqjax.load.load_params` returns them) and calibration token
  windows (an int array [n, t], or a sequence of [b, t] batches) -> a `QuantizedModel`.

  mesh (see `cqjax.sharding`): params are placed by its rules, K-means and ACCF run each expert
  on the device that holds it, calibration activations are split along `data`; the result is
  the single-device one (same codes; centroids up to float32 reduction order).

  Host-resident params (numpy leaves, as `load_params(..., on_host=True)` returns them) are
  quantized layer by layer: each step holds one tensor or one decoder layer on the device
  (calibration and ACCF carry the activations of every window between layers), and the
  returned params stay in host memory. The result equals the device-resident run's."""
  if mesh is None:
    return _quantize(params, model_config, calibration_batches, config, dtype, progress, checkpoint_dir)
  if on_host(params):
    raise CqjaxError("quantize: host-resident params (layer streaming) with a mesh are not supported; "
                     "pass device arrays with mesh=, or host arrays without it")
  with jax.set_mesh(mesh):
    return _quantize(shard_params(params, mesh), model_config, calibration_batches, config, dtype, progress,
                     checkpoint_dir)


def _quantize(params, model_config, calibration_batches, config, dtype, progress, checkpoint_dir) -> QuantizedModel:
  windows = np.concatenate([np.asarray(b) for b in calibration_batches]) if isinstance(
      calibration_batches, (list, tuple)) else np.asarray(calibration_batches)
  _check(config, windows)
  if checkpoint_dir is not None:
    _open_checkpoint(checkpoint_dir, _fingerprint(config, model_config, params, windows))
  host = on_host(params)
  cfg, folded = fold_norms(model_config, params)
  act = None if config.act_bits >= 16 else ActQuantConfig(bits=config.act_bits, scope=config.scope)

  def rotation():
    if config.rotation == "hadamard":
      return {"r1": initial_rotation(cfg.hidden_size, config.seed)}
    if host:
      norm_outputs = collect_norm_outputs_by_layer(cfg, folded, windows, config.calib_batch_size,
                                                   compute_dtype=dtype, progress=progress)
    else:
      norm_outputs = collect_norm_outputs(MoeCausalLM(cfg, dtype), folded, windows, config.calib_batch_size,
                                          progress=progress)
    aos = dataclasses.replace(config.aos, act=act or config.aos.act, seed=config.seed)
    r1, losses = learn_rotation(norm_outputs, aos, progress)
    return {"r1": r1, "aos_loss": np.asarray(losses, np.float64)}

  history, r1 = {}, None
  if config.rotation != "none":
    rot = _checkpointed(checkpoint_dir, "rotation", rotation)
    r1 = np.asarray(rot["r1"])
    if "aos_loss" in rot:
      history["aos"] = [float(v) for v in np.asarray(rot["aos_loss"])]
  base, full_rot = rotate_for_scope(cfg, folded, r1, config.scope)
  if config.pog:
    base = apply_pog(cfg, base, config.group_size, permute_down=not full_rot)

  def clustered():
    def quantizer(w, path):
      cb = kmeans_quantize(jnp.asarray(w), config.bits, column_group(w.shape[-2], config.group_size), seed=config.seed)
      return to_host(cb, host)

    bar = tqdm(total=len(scope_paths(cfg, config.scope)), desc="k-means", disable=not progress, leave=False)
    q = quantize_scope(cfg, base, config.scope, quantizer, bar)
    bar.close()
    return q

  q = jax.tree_util.tree_map(np.asarray if host else jnp.asarray, _checkpointed(checkpoint_dir, "kmeans", clustered))
  if config.accf is not None:
    accf_windows = windows[: config.accf_samples] if config.accf_samples else windows
    q, history["accf"] = finetune_centroids(cfg, base, q, accf_windows, act, full_rot, config.accf, dtype,
                                            None if checkpoint_dir is None else os.path.join(checkpoint_dir, "accf"), progress)
  return QuantizedModel(cfg, q, act, full_rot, r1, history)
