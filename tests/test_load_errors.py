"""Bad checkpoints give one-line CqjaxError messages naming the file, key or tensor."""
import json
import os
import shutil

import pytest

from cqjax.errors import CqjaxError
from cqjax.load import load_params


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _raises(path, match):
  with pytest.raises(CqjaxError, match=match) as e:
    load_params(str(path), progress=False)
  assert "\n" not in str(e.value)


def test_missing_directory(tmp_path):
  _raises(tmp_path / "nope", "model directory not found")


def test_missing_config(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  os.remove(d / "config.json")
  _raises(d, "config.json not found")


def test_unknown_model_type(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(d, r"unknown model_type 'gpt2'")


def test_no_safetensors(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  os.remove(d / "model.safetensors")
  _raises(d, r"no \*\.safetensors")


def test_truncated_safetensors(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  _raises(d, r"model\.safetensors: truncated")


def test_missing_shard(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral_sharded"], tmp_path)
  shard = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[0]
  os.remove(d / shard)
  _raises(d, f"{shard}: shard listed in .* is missing")


def test_shape_disagrees_with_config(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] += 8
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(d, r"tensor 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight' has shape "
             r"\[40, 48\], config\.json implies \[48, 48\]")


def test_missing_tensor(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["num_hidden_layers"] = 3
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(d, r"tensor 'model\.layers\.2\.self_attn\.q_proj\.weight' not found")


def test_unsupported_rope_type(tmp_path, hf_checkpoints):
  d = _copy(hf_checkpoints["mixtral"], tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
  (d / "config.json").write_text(json.dumps(cfg))
  _raises(d, "rope_type 'yarn' is not supported")
