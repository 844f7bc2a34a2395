"""Probe: a Mosaic GPU codebook matmul (weights decoded in registers as wgmma's A operand, x^T in
shared memory as B), timed against XLA's bf16 dot and the Pallas (Triton) kernel on the same
weights. python -m experiments.probe_mosaic_lut [--interpret] [--compile_only]"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def lut_matmul_mgpu(x, packed, cents, *, block_n=64, block_k=128, steps=2, k_splits=1, interpret=False):
  """x [m, k] @ (packed uint8 [n, k/2] of 4-bit codes, cents [n, 16]) -> [m, n]."""
  m, k = x.shape
  n = packed.shape[0]
  mp = max(16, -(-m // 16) * 16)
  kh, bkh = k // 2, block_k // 2
  k_steps = kh // bkh // k_splits
  assert n % block_n == 0 and kh % (bkh * k_splits) == 0, (n, k, block_n, block_k, k_splits)
  xe = jnp.pad(x[:, 0::2], ((0, mp - m), (0, 0))).T  # [kh, mp]: inputs of the low nibbles
  xo = jnp.pad(x[:, 1::2], ((0, mp - m), (0, 0))).T
  cents = cents.reshape(n, 16).T  # [16, n]
  out_dtype = x.dtype if k_splits == 1 else jnp.float32

  def tf(minor, bits):
    sw = plgpu.find_swizzle(minor * bits)
    t = (plgpu.TilingTransform((8, sw * 8 // bits)),)
    return t if sw == 16 else t + (plgpu.SwizzleTransform(sw),)

  lc = (lambda a, l: a) if interpret else plgpu.layout_cast
  wg = plgpu.Layout.WGMMA
  row = wg.reduce(1)

  def kernel(codes_gmem, cent_gmem, xe_gmem, xo_gmem, o_gmem, cent_smem, bar, *a_smem):
    ni, si = lax.axis_index("n"), lax.axis_index("s")
    plgpu.copy_gmem_to_smem(cent_gmem.at[:, pl.ds(ni * block_n, block_n)], cent_smem, bar)
    plgpu.barrier_wait(bar)

    def acc_scope(acc_ref):
      table = [lc(cent_smem[j], row) for j in range(16)]

      def decode(v):
        lvl = [lax.broadcast_in_dim(t, v.shape, (0,)) for t in table]
        for i in range(4):
          bit = ((v >> i) & 1) == 1
          lvl = [jnp.where(bit, lvl[2 * j + 1], lvl[2 * j]) for j in range(len(lvl) // 2)]
        return lvl[0]

      def operand(w, i):
        if not a_smem:  # the interpreter's wgmma reads A from shared memory only
          return w
        a_smem[0][i] = w
        return a_smem[0].at[i]

      def body(_, c_smem, xe_smem, xo_smem):
        c = lc(c_smem[...], wg).astype(jnp.int32)
        plgpu.wgmma(acc_ref, operand(decode(c & 15), 0), xe_smem)
        plgpu.wgmma(acc_ref, operand(decode(c >> 4), 1), xo_smem)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          body, grid=(k_steps,),
          in_specs=[plgpu.BlockSpec((block_n, bkh), lambda kk: (ni, si * k_steps + kk), transforms=tf(bkh, 8)),
                    plgpu.BlockSpec((bkh, mp), lambda kk: (si * k_steps + kk, 0), transforms=tf(mp, 16)),
                    plgpu.BlockSpec((bkh, mp), lambda kk: (si * k_steps + kk, 0), transforms=tf(mp, 16))],
          max_concurrent_steps=steps,
      )(codes_gmem, xe_gmem, xo_gmem)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)))
    o_gmem[si, pl.ds(ni * block_n, block_n), :] = acc.astype(o_gmem.dtype)

  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
    kwargs["interpret"] = InterpretGPUParams()
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((k_splits, n, mp), out_dtype),
                   grid=(n // block_n, k_splits), grid_names=("n", "s"),
                   scratch_types=[plgpu.SMEM((16, block_n), cents.dtype), plgpu.Barrier()]
                   + ([plgpu.SMEM((2, block_n, bkh), x.dtype)] if interpret else []), **kwargs)
  out = f(packed, cents, xe, xo)
  return out.sum(0).astype(x.dtype)[:, :m].T if k_splits > 1 else out[0, :, :m].T


def _prmt_decoder(block_n, kt):
  """An inline_mgpu function: codes uint4 [block_n, kt] (WGMMA_UPCAST_4X: a thread's word of eight
  codes of one row) and DECODE4_PTX's eight table registers of its rows -> bf16 [block_n, kt] in the
  WGMMA layout, each word's four bf16 pairs put where the layout has that thread's pairs of four
  8-column tiles (x's columns permuted to match: prmt_permutation)."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import arith, llvm  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels.lut_matmul import DECODE4_PTX, DECODE4_SELECTORS  # pylint: disable=g-import-not-at-top
  up4, wg = plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA
  row = wg.reduce(1)

  @plgpu.inline_mgpu(arg_types=(up4,) + (row,) * 8,
                     return_type=plgpu.ShapeDtypeStruct((block_n, kt), jnp.bfloat16, layout=wg))
  def decode(ctx, codes, *tables):
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    bf2 = ir.VectorType.get((2,), ir.BF16Type.get())
    out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((block_n, kt)), dtype=object)
    for idx in np.ndindex(codes.registers.shape):
      b, a = idx[1], idx[4]
      word = mgpu.utils.bitcast(codes.registers[idx], i32)
      regs = [mgpu.utils.bitcast(t.registers[0, 0, a, 0, 0], i32) for t in tables]
      sel = llvm.inline_asm(i64, [word], DECODE4_SELECTORS[0], "=l,r")
      for half in range(2):
        four = llvm.inline_asm(i64, [sel, *regs], DECODE4_PTX[half], "=l,l," + ",".join(["r"] * 8))
        pairs = (arith.trunci(i32, four), arith.trunci(i32, arith.shrui(four, arith.constant(i64, 32))))
        for q, pair in enumerate(pairs):
          out[pair_register(idx, 2 * half + q)] = mgpu.utils.bitcast(pair, bf2)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode


def pair_register(word_register: tuple, pair: int) -> tuple:
  """Where the prmt decoder puts bf16 pair `pair` (codes 2*pair, 2*pair + 1) of the word at register
  index `word_register` of WGMMA_UPCAST_4X: the same thread's WGMMA register of column tile
  4 * (word's 32-column block) + pair, same row half."""
  o = list(word_register)
  o[1] = 4 * word_register[1] + pair
  return tuple(o)


def prmt_permutation(k):
  """x's column at B row 32b + 8p + 2c + v: the code at 32b + 8c + 2p + v (thread c's word, pair p)."""
  j = np.arange(k)
  b, p, c, v = j // 32, j % 32 // 8, j % 8 // 2, j % 2
  return 32 * b + 8 * c + 2 * p + v


def lut_matmul_mgpu_prmt(x, packed, cents, *, block_n=64, block_k=128, steps=2, k_splits=1):
  """As lut_matmul_mgpu, the weights decoded by byte permutes (compiled only)."""
  from pallas_kernels.lut_matmul import decode4_registers  # pylint: disable=g-import-not-at-top
  m, k = x.shape
  n = packed.shape[0]
  mp = max(16, -(-m // 16) * 16)
  k_steps = k // block_k // k_splits
  assert n % block_n == 0 and k % (block_k * k_splits) == 0 and block_k % 32 == 0
  xt = jnp.pad(x[:, prmt_permutation(k)], ((0, mp - m), (0, 0))).T  # [k, mp]
  codes = jax.lax.bitcast_convert_type(packed, jnp.uint4).reshape(n, k)
  c16 = cents.reshape(n, 16)
  tables = jnp.stack(decode4_registers([c16[:, j] for j in range(16)]))  # [8, n] uint32
  out_dtype = x.dtype if k_splits == 1 else jnp.float32

  def tf(minor, bits):
    sw = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))

  up4, wg = plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA
  row = wg.reduce(1)
  decode = _prmt_decoder(block_n, block_k)

  def kernel(codes_gmem, tab_gmem, x_gmem, o_gmem, tab_smem, bar):
    ni, si = lax.axis_index("n"), lax.axis_index("s")
    plgpu.copy_gmem_to_smem(tab_gmem.at[:, pl.ds(ni * block_n, block_n)], tab_smem, bar)
    plgpu.barrier_wait(bar)

    def acc_scope(acc_ref):
      regs = [plgpu.load(tab_smem, (j, slice(None)), layout=row) for j in range(8)]

      def body(_, c_smem, x_smem):
        plgpu.wgmma(acc_ref, decode(plgpu.load(c_smem, (), layout=up4), *regs), x_smem)
        plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          body, grid=(k_steps,),
          in_specs=[plgpu.BlockSpec((block_n, block_k), lambda kk: (ni, si * k_steps + kk), transforms=tf(block_k, 4)),
                    plgpu.BlockSpec((block_k, mp), lambda kk: (si * k_steps + kk, 0), transforms=tf(mp, 16))],
          max_concurrent_steps=steps,
      )(codes_gmem, x_gmem)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)))
    o_gmem[si, pl.ds(ni * block_n, block_n), :] = acc.astype(o_gmem.dtype)

  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((k_splits, n, mp), out_dtype),
                   grid=(n // block_n, k_splits), grid_names=("n", "s"),
                   scratch_types=[plgpu.SMEM((8, block_n), jnp.uint32), plgpu.Barrier()])
  out = f(codes, tables, xt)
  return out.sum(0).astype(x.dtype)[:, :m].T if k_splits > 1 else out[0, :, :m].T


def reference(x, packed, cents):
  codes = jnp.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).astype(jnp.int32)
  w = jnp.take_along_axis(cents.reshape(cents.shape[0], 16), codes, axis=1)
  return jnp.dot(x.astype(jnp.float32), w.T.astype(jnp.float32)).astype(x.dtype)


def per_call_us(fn, args, repeats=7, calls=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls * 1e6)
  return statistics.median(times)


def operands(seed, m, k, n):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16),
          jnp.asarray(r.integers(0, 256, (n, k // 2)), jnp.uint8),
          jnp.asarray(r.standard_normal((n, 16)), jnp.bfloat16))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--shapes", default="4096x14336,14336x4096")
  ap.add_argument("--ms", default="1,16,128")
  ap.add_argument("--configs", default="select:64,128,2,1;prmt:64,128,2,1;prmt:64,256,2,1;prmt:64,128,4,1;"
                                       "prmt:64,256,4,1;prmt:64,128,2,4")
  a = ap.parse_args()
  if a.interpret:
    for m, k, n, kw in [(1, 256, 64, {}), (3, 512, 128, dict(k_splits=2)), (17, 256, 128, dict(block_k=256)),
                        (40, 256, 64, dict(steps=4))]:
      x, p, c = operands(m + k + n, m, k, n)
      got = np.asarray(lut_matmul_mgpu(x, p, c, interpret=True, **kw), np.float32)
      ref = np.asarray(reference(x, p, c), np.float32)
      print(m, k, n, kw, "max abs err", np.abs(got - ref).max(), "of", np.abs(ref).max())
    return
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  kinds = {"select": lut_matmul_mgpu, "prmt": lut_matmul_mgpu_prmt}
  configs = [(c.split(":")[0], *(int(v) for v in c.split(":")[1].split(","))) for c in a.configs.split(";")]
  sets = 8
  for shape in a.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    ws = [operands(i, 1, k, n)[1:] for i in range(sets)]
    dense = [jnp.asarray(np.random.default_rng(100 + i).standard_normal((k, n)), jnp.bfloat16) for i in range(sets)]
    cents4 = [c.reshape(n, 1, 16) for _, c in ws]
    for m in (int(v) for v in a.ms.split(",")):
      x = operands(1000 + m, m, k, n)[0]
      t_bf16 = per_call_us(jax.jit(lambda x, ds: [x @ d for d in ds]), (x, dense)) / sets
      t_pk = per_call_us(jax.jit(lambda x, ws, cs: [pk.lut_matmul(x, p, c, 4) for (p, _), c in zip(ws, cs)]),
                         (x, ws, cents4)) / sets
      line = f"{k}x{n} M={m:<3} bf16 {t_bf16:6.1f} us  pallas-triton {t_pk:6.1f} ({t_bf16 / t_pk:4.2f}x)"
      for kind, bn, bk, st, ks in configs:
        name = f"{kind} {bn},{bk},{st},{ks}"
        try:
          kw = dict(block_n=bn, block_k=bk, steps=st, k_splits=ks)
          fn = kinds[kind]
          got = fn(x, *ws[0], **kw)
          ref = reference(x, *ws[0]).astype(jnp.float32)
          err = float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
          f = jax.jit(lambda x, ws, kw=kw, fn=fn: [fn(x, p, c, **kw) for p, c in ws])
          t = per_call_us(f, (x, ws)) / sets
          line += f" | {name}: {t:6.1f} ({t_bf16 / t:4.2f}x, err {err:.2g})"
        except Exception as e:  # pylint: disable=broad-except
          line += f" | {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:100]}"
      print(line, flush=True)


if __name__ == "__main__":
  sys.exit(main())
