"""Writing params as a Hugging Face checkpoint round-trips through the loader exactly."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.load import load_params
from cqjax.save_hf import save_hf_checkpoint


@pytest.mark.parametrize("name,shard_bytes", [("mixtral", 5 << 30), ("qwen3_moe", 20_000), ("deepseek_v2", 20_000),
                                             ("deepseek_v2_greedy", 5 << 30)])
def test_round_trip(tmp_path, hf_checkpoints, name, shard_bytes):
  src = hf_checkpoints[name]
  cfg, params = load_params(src, jnp.float32, progress=False)
  hf_config = json.load(open(os.path.join(src, "config.json")))
  save_hf_checkpoint(str(tmp_path), cfg, params, hf_config, jnp.float32, shard_bytes)
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == (shard_bytes < 1e6)
  cfg2, params2 = load_params(str(tmp_path), jnp.float32, progress=False)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
