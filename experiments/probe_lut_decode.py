"""Where the time of the Pallas codebook matmul goes at decode (M = 1): controls and variants of
its K loop, timed like bench_kernels (one jit over 8 weights), on 4096x14336 4-bit codes.

  python -m experiments.probe_lut_decode            # table of variants
  python -m experiments.probe_lut_decode --profile  # a few calls of the kernel, for ncu

Variants (16 output rows a program, 256 code bytes a step, no split-K):
  loadonly    sums the code bytes: the loop's memory structure alone
  nocodebook  codes -> float directly: everything but the table lookup
  gather      the kernel's decode (table-ref gather), masks as the kernel has them
  nomask      gather without load masks (the shape divides the blocks)
  prefetch    nomask, with the next step's codes loaded one iteration ahead
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments.bench_kernels import BITS, _codebook, _per_call_us, copy_bandwidth_gbs
from pallas_kernels import lut_matmul as pk

VARIANTS = ("loadonly", "nocodebook", "gather", "nomask", "prefetch")


def _fma(a, b, c):
  """a * b + c as one FFMA (Triton emits FMUL + FADD for the jnp expression)."""
  return plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r",
                                      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


@functools.partial(jax.jit, static_argnames=("variant", "bn", "bkb", "warps", "reduce", "fma", "words"))
def probe(x, packed, centroids, variant, bn=16, bkb=256, warps=4, reduce=False, fma=False, words=False):
  """reduce: sum each step's products over K at once ([bn] accumulator, few registers) instead
  of keeping an elementwise [bn, bkb] accumulator until the end. fma: FFMA by inline PTX.
  words: load the codes as uint32 (8 codes a word) instead of bytes."""
  n, nbytes = packed.shape
  per = 8 if words else 2  # codes per loaded element
  if words:
    packed = jax.lax.bitcast_convert_type(packed.reshape(n, nbytes // 4, 4), jnp.uint32)
    nbytes, bkb = nbytes // 4, bkb // 4
  xs = jnp.moveaxis(x.reshape(1, nbytes, per), 2, 0)  # [per, 1, elements]
  table = centroids.astype(x.dtype).reshape(-1)
  masked = variant in ("loadonly", "nocodebook", "gather")

  def kernel(xs_ref, packed_ref, table_ref, out_ref):
    pn = pl.program_id(0)
    rows = pn * bn + jnp.arange(bn)
    n_ok = rows < n

    def load(b0):
      ref = packed_ref.at[pl.ds(pn * bn, bn), pl.ds(b0, bkb)]
      if masked:
        return plgpu.load(ref, mask=n_ok[:, None] & (b0 + jnp.arange(bkb) < nbytes)[None, :], other=0)
      return plgpu.load(ref)

    def compute(b0, codes, acc):
      codes = codes if words else codes.astype(jnp.int32)
      if variant == "loadonly":
        v = codes.astype(jnp.float32)[None]
        return acc + (v.sum(-1) if reduce else v)
      for s in range(per):
        code = codes >> (4 * s) if s else codes
        if s < per - 1:
          code = code & 15
        code = code.astype(jnp.int32)
        if variant == "nocodebook":
          w = code.astype(jnp.float32)
        else:
          w = table_ref[rows[:, None] * 16 + code].astype(jnp.float32)
        xv = plgpu.load(xs_ref.at[jnp.int32(s), pl.ds(0, 1), pl.ds(b0, bkb)]).astype(jnp.float32)
        if fma and not reduce:
          acc = _fma(jnp.broadcast_to(xv[:, None, :], acc.shape), w[None], acc)
        else:
          prod = xv[:, None, :] * w[None]
          acc = acc + (prod.sum(-1) if reduce else prod)
      return acc

    steps = nbytes // bkb
    acc0 = jnp.zeros((1, bn) if reduce else (1, bn, bkb), jnp.float32)
    if variant == "prefetch":
      def body(i, carry):
        codes, acc = carry
        nxt = load(jnp.minimum(i + 1, steps - 1) * bkb)
        return nxt, compute(i * bkb, codes, acc)
      _, acc = jax.lax.fori_loop(0, steps, body, (load(0), acc0))
    else:
      acc = jax.lax.fori_loop(0, steps, lambda i, acc: compute(i * bkb, load(i * bkb), acc), acc0)
    plgpu.store(out_ref.at[pl.ds(0, 1), pl.ds(pn * bn, bn)], acc if reduce else acc.sum(-1))

  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32), grid=(pl.cdiv(n, bn),),
                        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=2))(xs, packed, table)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--profile", action="store_true")
  args = ap.parse_args()
  k, n, sets = 4096, 14336, 8
  key = jax.random.key(0)
  weights = [_codebook(jax.random.fold_in(key, i), (), k, n) for i in range(sets)]
  x = jax.random.normal(key, (1, k), jnp.bfloat16)
  if args.profile:
    for _ in range(3):
      jax.block_until_ready(pk.lut_matmul(x, weights[0].packed, weights[0].centroids, BITS))
      jax.block_until_ready(probe(x, weights[0].packed, weights[0].centroids, "loadonly"))
    return
  bw = copy_bandwidth_gbs()
  nbytes = weights[0].packed.nbytes + weights[0].centroids.nbytes
  dense = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16) for i in range(sets)]
  rows = [("xla bf16 dot", _per_call_us(jax.jit(lambda x, ws: [x @ w for w in ws]), (x, dense)) / sets),
          ("kernel (default tuning)", _per_call_us(
              jax.jit(lambda x, ws: [pk.lut_matmul(x, w.packed, w.centroids, BITS) for w in ws]), (x, weights)) / sets)]
  ref = pk.lut_matmul(x, weights[0].packed, weights[0].centroids, BITS).astype(jnp.float32)
  configs = [dict(variant=v, warps=w) for v in VARIANTS for w in (4, 8)]
  configs += [dict(variant=v, bkb=bkb, warps=w, reduce=True) for v in ("loadonly", "gather", "prefetch")
              for bkb in (256, 512, 1024) for w in (2, 4, 8)]
  configs += [dict(variant="gather", fma=True, warps=w, bkb=b) for w in (4, 8) for b in (128, 256)]
  configs += [dict(variant=v, words=True, warps=w, bkb=b, reduce=r, fma=not r)
              for v in ("loadonly", "gather") for w in (4, 8) for b in (256, 512) for r in (False, True)]
  for cfg in configs:
    f = jax.jit(lambda x, ws, c=tuple(cfg.items()): [probe(x, w.packed, w.centroids, **dict(c)) for w in ws])
    name = " ".join(f"{k}={v}" for k, v in cfg.items())
    try:
      us = _per_call_us(f, (x, weights)) / sets
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
      continue
    if cfg["variant"] not in ("loadonly", "nocodebook"):
      got = probe(x, weights[0].packed, weights[0].centroids, **cfg)
      err = float(jnp.max(jnp.abs(got - ref)))
      if not err < 1e-2 * float(jnp.max(jnp.abs(ref))):
        name += f" WRONG (max err {err:.2e})"
    rows.append((name, us))
  print(f"copy {bw:.0f} GB/s; 4-bit floor {nbytes / bw / 1e3:.1f} us")
  for name, us in rows:
    print(f"{name:58s} {us:7.1f} us  {nbytes / us / 1e3:6.0f} GB/s")


if __name__ == "__main__":
  main()
