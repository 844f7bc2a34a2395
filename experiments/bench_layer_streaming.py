"""Layer streaming at a real model's layer shapes: `cqjax.quantize` on host-resident params of
random weights (speed and memory do not depend on the values), reporting the wall time and the
device's peak memory against the bytes of the model held on the host.

  python -m experiments.bench_layer_streaming --model=mixtral-8x7b --layers=4 --windows=64

--layers cuts the model to its first L layers (every layer has the same shapes, so time per layer
and peak device memory carry over to the whole model); --model names an entry of
`experiments.memory_plan.MODELS`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np


def random_host_params(cfg, dtype, seed=0):
  """The model's params drawn on the device one layer at a time and kept in host memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: MoeCausalLM(cfg, dtype).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  draw = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                 static_argnums=1)
  out = []
  for i, leaf in enumerate(leaves):
    a = draw(jax.random.key(seed * 100003 + i), leaf.shape)
    if leaf.ndim == 1:  # norm scales
      a = jnp.ones(leaf.shape, dtype)
    out.append(np.asarray(jax.device_get(a)))
  return jax.tree.unflatten(treedef, out)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="mixtral-8x7b")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--windows", type=int, default=64, help="calibration windows (the paper: 512)")
  ap.add_argument("--seqlen", type=int, default=256)
  ap.add_argument("--accf_batch", type=int, default=8)
  ap.add_argument("--out", default="experiments/results/layer-streaming")
  a = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cqjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cqjax.finetune_centroids import AccfConfig  # pylint: disable=g-import-not-at-top
  from cqjax.learn_rotation import AosConfig  # pylint: disable=g-import-not-at-top
  from cqjax.quantize import QuantizeConfig, quantize  # pylint: disable=g-import-not-at-top
  from experiments.memory_plan import MODELS  # pylint: disable=g-import-not-at-top

  full = ModelConfig(**MODELS[a.model])
  cfg = dataclasses.replace(full, num_layers=a.layers, dense_layers=tuple(i for i in full.dense_layers if i < a.layers))
  t0 = time.perf_counter()
  host = random_host_params(cfg, jnp.bfloat16)
  init_s = time.perf_counter() - t0
  host_bytes = sum(x.nbytes for x in jax.tree.leaves(host))
  layer_bytes = sum(x.nbytes for x in jax.tree.leaves(host["layers_0"]))
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.windows, a.seqlen))
  config = QuantizeConfig(bits=4, scope="full", aos=AosConfig(epochs=1, batch_size=16),
                          accf=AccfConfig(lr=1e-3, optimizer="adam", epochs=1, batch_size=a.accf_batch))
  dev = jax.devices()[0]
  t0 = time.perf_counter()
  q = quantize(host, cfg, windows, config, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.tree.leaves(q.params))
  quantize_s = time.perf_counter() - t0
  stats = dev.memory_stats() or {}
  result = {"device": dev.device_kind, "model": a.model, "layers": a.layers, "windows": a.windows, "seqlen": a.seqlen,
            "accf_batch": a.accf_batch, "host_param_gb": host_bytes / 1e9, "layer_gb": layer_bytes / 1e9,
            "full_model_bf16_gb": layer_bytes * full.num_layers / 1e9, "init_s": init_s, "quantize_s": quantize_s,
            "quantize_s_per_layer": quantize_s / a.layers,
            "peak_device_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
            "result_on_host": all(isinstance(x, np.ndarray) for x in jax.tree.leaves(q.params))}
  print(json.dumps(result, indent=1))
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, f"{a.model}-{a.layers}layers.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
