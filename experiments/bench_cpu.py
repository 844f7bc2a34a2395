"""CPU benchmark of the FFI codebook matmul against XLA's f32 and bf16 dot, and decode speed of
the tiny reference model, full precision vs 4-bit codebooks.

  python -m experiments.bench_cpu [--repeats=N] [--out=experiments/results/bench-cpu]

Each timing is one jitted call over `sets` distinct weights (more bytes than the caches hold),
median of `repeats` calls after a warm-up, reported per weight. Baselines run in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import lut_matmul as cpu
from cqjax.codebook import from_codes
from cqjax.lut_matmul import kernels_mode, lut_matmul


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def bench_matmul(k, n, ms, sets, repeats, bits=4):
  rng = np.random.default_rng(0)
  weights = [from_codes(jnp.asarray(rng.integers(0, 2 ** bits, (n, k)), jnp.uint8),
                        jnp.asarray(rng.normal(size=(n, 1, 2 ** bits)), jnp.float32), bits) for _ in range(sets)]
  dense = [jnp.asarray(rng.normal(size=(k, n)), jnp.float32) for _ in range(sets)]
  dense16 = [d.astype(jnp.bfloat16) for d in dense]
  rows = []
  for m in ms:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    run = jax.jit(lambda x, ws: sum(lut_matmul(x, w)[0, 0] for w in ws))
    f32 = jax.jit(lambda x, ws: sum((x @ w)[0, 0] for w in ws))
    b16 = jax.jit(lambda x, ws: sum((x.astype(jnp.bfloat16) @ w)[0, 0].astype(jnp.float32) for w in ws))
    t_q = _median_ms(run, (x, weights), repeats) / sets
    t_qb = _median_ms(run, (x.astype(jnp.bfloat16), weights), repeats) / sets
    t_f = _median_ms(f32, (x, dense), repeats) / sets
    t_b = _median_ms(b16, (x, dense16), max(3, repeats // 3)) / sets
    gbs = (n * ((k * bits + 7) // 8) + n * 16 * 4) / (t_q * 1e-3) / 1e9
    row = {"k": k, "n": n, "m": m, "bits": bits, "codebook_f32_x_ms": t_q, "codebook_bf16_x_ms": t_qb,
           "xla_f32_ms": t_f, "xla_bf16_ms": t_b, "speedup_f32_x_vs_xla_f32": t_f / t_q,
           "speedup_bf16_x_vs_xla_f32": t_f / t_qb, "speedup_bf16_x_vs_xla_bf16": t_b / t_qb,
           "codebook_f32_x_code_gbs": gbs}
    if cpu.int8_supported(bits, k, 1):
      int8 = jax.jit(lambda x, ws: sum(cpu.lut_matmul(x, w.packed, w.centroids, bits, int8=True)[0, 0] for w in ws))
      row["codebook_int8_ms"] = _median_ms(int8, (x, weights), repeats) / sets
      row["speedup_int8_vs_xla_f32"] = t_f / row["codebook_int8_ms"]
    rows.append(row)
    int8_note = f", int8 {row['codebook_int8_ms']:.3f} ms" if "codebook_int8_ms" in row else ""
    print(f"{k}x{n} M={m} {bits}-bit: codebook f32-x {t_q:.3f} ms ({gbs:.1f} GB/s of codes), bf16-x {t_qb:.3f} ms"
          f"{int8_note} | XLA f32 {t_f:.3f} ms, bf16 {t_b:.3f} ms -> {t_f / t_q:.2f}x / {t_f / t_qb:.2f}x vs f32", flush=True)
  return rows


def bench_decode(tokens, repeats):
  from cqjax.generate import generate  # pylint: disable=g-import-not-at-top
  from cqjax.kmeans import kmeans_quantize  # pylint: disable=g-import-not-at-top
  from cqjax.load import load_params  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.quantize_weights import quantize_scope  # pylint: disable=g-import-not-at-top
  from experiments.configs.tiny import get_config  # pylint: disable=g-import-not-at-top

  cfg, params = load_params(get_config().model_path, jnp.float32, progress=False)
  quantized = quantize_scope(cfg, params, "full", lambda w, path: kmeans_quantize(w, 4))
  model = MoeCausalLM(cfg)
  prompt = jnp.ones((1, 8), jnp.int32)
  run = jax.jit(lambda p: generate(model, p, prompt, tokens))
  out = {}
  for name, p in (("fp32", params), ("codebook_w4_full_scope", quantized)):
    ms = _median_ms(run, (p,), repeats)
    out[name] = {"ms": ms, "tokens_per_s": tokens / (ms * 1e-3)}
    print(f"tiny decode {name}: {tokens / (ms * 1e-3):.1f} tokens/s ({tokens} tokens, prefill of 8 included)")
  with kernels_mode("int8"):
    run8 = jax.jit(lambda p: generate(model, p, prompt, tokens))
    ms = _median_ms(run8, (quantized,), repeats)
  out["codebook_w4_full_scope_int8"] = {"ms": ms, "tokens_per_s": tokens / (ms * 1e-3)}
  print(f"tiny decode codebook_w4_full_scope_int8: {tokens / (ms * 1e-3):.1f} tokens/s")
  out["speedup"] = out["fp32"]["ms"] / out["codebook_w4_full_scope"]["ms"]
  return out


def int8_accuracy(windows_per_text: int = 64, seqlen: int = 512):
  """Perplexity with the float kernels and with the int8 path, on the first windows of
  WikiText-2 test and IMDB valid, for two 4-bit tiny models: K-means weights only (W4A16, no
  rotation: the norm outputs keep their outlier channels) and CodeQuant's serving form without
  fine-tuning (Hadamard R1 + R2 + online R4, K-means, 4-bit activations in scope full)."""
  import cqjax  # pylint: disable=g-import-not-at-top
  from cqjax.kmeans import kmeans_quantize  # pylint: disable=g-import-not-at-top
  from cqjax.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  from cqjax.quantize_weights import quantize_scope  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import eval_windows, read_text  # pylint: disable=g-import-not-at-top
  from experiments.configs.tiny import get_config  # pylint: disable=g-import-not-at-top

  path = get_config().model_path
  cfg, params = cqjax.load_params(path, jnp.float32, progress=False)
  tok = cqjax.load_tokenizer(path)
  w4a16 = quantize_scope(cfg, params, "full", lambda w, p: kmeans_quantize(w, 4))
  w4a4 = cqjax.quantize(params, cfg, np.zeros((1, 8), np.int32), cqjax.QuantizeConfig(
      rotation="hadamard", accf=None, scope="full", act_bits=4), progress=False)
  models = {"w4a16_kmeans": (cqjax.MoeCausalLM(cfg), w4a16), "w4a4_hadamard_kmeans": (w4a4.module(), w4a4.params)}
  out = {}
  for text_path in get_config().eval_texts.split(","):
    name, text = read_text(text_path)
    windows = eval_windows(np.asarray(tok(text)["input_ids"]), seqlen, name)[:windows_per_text]
    for label, (model, p) in models.items():
      row = {"windows": int(len(windows))}
      for mode in ("auto", "int8"):
        with kernels_mode(mode):
          row[mode] = perplexity(model, p, windows, batch_size=8, progress=False)["perplexity"]
      out[f"{label}/{name}"] = row
      print(f"tiny {label} perplexity on {name} ({len(windows)} windows of {seqlen}): float kernels "
            f"{row['auto']:.3f}, int8 {row['int8']:.3f}", flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--out", default="experiments/results/bench-cpu")
  args = ap.parse_args()
  shapes = [(4096, 14336, 4), (14336, 4096, 4), (4096, 4096, 4), (256, 192, 16), (192, 256, 16), (256, 256, 16)]
  rows = []
  for k, n, sets in shapes:
    rows += bench_matmul(k, n, (1, 4, 16), sets, args.repeats)
  rows += bench_matmul(4096, 14336, (1, 16), 4, args.repeats, bits=3)
  decode = bench_decode(64, args.repeats)
  decode["int8_accuracy"] = int8_accuracy()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "matmul": rows, "decode": decode}, f, indent=2)


if __name__ == "__main__":
  main()
