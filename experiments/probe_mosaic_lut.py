"""Probe: Mosaic GPU codebook matmuls, single and grouped over experts (weights decoded in
registers as wgmma's A operand, x^T in shared memory as B), timed on a GPU against XLA's bf16
`dot` / `ragged_dot` and the Pallas (Triton) kernels on the same weights, 8 weights (or past L2)
a jitted call, median of repeats:

  python -m experiments.probe_mosaic_lut [--shapes=4096x14336] [--ms=1,16] [--grouped=8x2x4096x14336]
  python -m experiments.probe_mosaic_lut --interpret   # no GPU: the select decode, interpreted

A probe towards Pallas' Mosaic GPU backend (its Triton backend is deprecated in jax 0.11): not
dispatched by cqjax until timed."""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cqjax.codebook import CodebookWeight, expert_slots
from cqjax.lut_matmul import grouped_lut_matmul_reference, lut_matmul_reference
from pallas_kernels.decode4 import decode4_registers


def _transforms(minor: int, bits: int) -> tuple:
  """Shared-memory tiling (and swizzle, where a row spans 32 bytes or more) for tiles of `minor`
  elements of `bits` bits a row, as TMA and wgmma read them."""
  sw = plgpu.find_swizzle(minor * bits)
  t = (plgpu.TilingTransform((8, sw * 8 // bits)),)
  return t if sw == 16 else t + (plgpu.SwizzleTransform(sw),)


def x_columns(k: int, decode: str) -> np.ndarray:
  """x's column at each row of wgmma's B: the select decode multiplies the low nibbles (even
  inputs) and then the high ones (odd), the byte-permute decode as prmt_permutation places them."""
  if decode == "select":
    return np.concatenate([np.arange(0, k, 2), np.arange(1, k, 2)])
  return prmt_permutation(k)


def grouped_lut_matmul_mgpu(x, packed, cents, group_sizes, *, decode="prmt", block_n=64, block_k=128, steps=2,
                            k_splits=1, interpret=False):
  """x [t, k] rows sorted by expert @ (packed uint8 [e, n, k/2] of 4-bit codes, cents [e, n, 16] or
  [e, n, groups, 16]: a codebook a row or a column group of k / groups inputs) by group_sizes
  int32 [e] -> [t, n] (the ragged_dot contract: rows past the last group are zero). group_sizes
  None: one weight (e = 1) for every row, with no slot table built and no rows gathered.

  Each expert with rows is a slot (cqjax.codebook.expert_slots; min(e, t) slots, so experts
  without rows launch nothing); a program owns block_n outputs of one slot and a 1/k_splits share
  of k, and its slot's rows (up to mp, a multiple of 16) are wgmma's N: the swapped product
  y^T = W x^T, the weights decoded in registers as A. A row's codebook is read once a program;
  column groups' come with each K step's codes (block_k must divide the group). decode: "select"
  (a tree of selects over the 16 centroids, plain jnp: also runs in Mosaic GPU's interpreter) or
  "prmt" (DECODE4_PTX's byte permutes, inline PTX: compiled only)."""
  t, k = x.shape
  e, n = packed.shape[:2]
  if decode not in ("select", "prmt") or (decode == "prmt" and interpret):
    raise ValueError(f"decode={decode!r}: 'select', or 'prmt' compiled (inline PTX)")
  c = cents.reshape(e, n, -1, 16)
  groups = c.shape[2]
  group_size = k // groups
  mp = max(16, -(-t // 16) * 16)
  step_k = block_k // 2 if decode == "select" else block_k  # B rows a wgmma of a step
  k_steps = k // block_k // k_splits
  if (mp > 256 or n % block_n or k % (block_k * k_splits) or block_k % 32 or k % groups
      or (groups > 1 and group_size % block_k)):
    raise ValueError(f"t={t} (at most 256), n={n} (a multiple of block_n={block_n}) and k={k} (of block_k="
                     f"{block_k} x k_splits={k_splits}, block_k a multiple of 32 dividing the codebook group, "
                     f"{groups} groups) do not fit")
  if group_sizes is None:
    slots, table = 1, jnp.array([[0], [0], [t]], jnp.int32)
    xs = jnp.pad(x, ((0, mp - t), (0, 0)))[None]  # [1, mp, k]
  else:
    slots = min(e, t)
    table = expert_slots(group_sizes, slots)  # [3, slots]: expert, first row, rows
    j = jnp.arange(mp)
    rows = table[1][:, None] + j
    xs = jnp.where((j < table[2][:, None])[..., None], x[jnp.minimum(rows, t - 1)], 0)  # [slots, mp, k]
  xs = xs[:, :, x_columns(k, decode)].transpose(0, 2, 1)  # [slots, k, mp]
  if decode == "select":
    codes, tab = packed, c.transpose(0, 2, 3, 1)  # [e, groups, 16, n]
  else:
    codes = jax.lax.bitcast_convert_type(packed, jnp.uint4).reshape(e, n, k)
    tab = jnp.stack(decode4_registers([c[..., i] for i in range(16)]), axis=2)  # [e, n, 8, groups] uint32
    tab = tab.transpose(0, 3, 2, 1)  # [e, groups, 8, n]
  tab = tab[:, 0] if groups == 1 else tab
  tab_rows = tab.shape[-2]
  out_dtype = x.dtype if k_splits == 1 else jnp.float32
  wg = plgpu.Layout.WGMMA
  row = wg.reduce(1)
  lc = (lambda a, _: a) if interpret else plgpu.layout_cast  # the interpreter has no layouts

  def load_tables(ref, lead=()):
    if decode == "select":
      return [lc(ref[(*lead, i)], row) for i in range(16)]
    return [plgpu.load(ref, (*lead, i, slice(None)), layout=row) for i in range(8)]

  def select_step(acc_ref, table, c_smem, xe_smem, xo_smem, a_smem):
    def decode_half(v):
      lvl = [lax.broadcast_in_dim(c, v.shape, (0,)) for c in table]
      for b in range(4):
        bit = ((v >> b) & 1) == 1
        lvl = [jnp.where(bit, lvl[2 * i + 1], lvl[2 * i]) for i in range(len(lvl) // 2)]
      return lvl[0]

    def operand(w, i):
      if not a_smem:
        return w
      a_smem[0][i] = w  # the interpreter's wgmma reads A from shared memory only
      return a_smem[0].at[i]

    v = lc(c_smem[...], wg).astype(jnp.int32)
    plgpu.wgmma(acc_ref, operand(decode_half(v & 15), 0), xe_smem)
    plgpu.wgmma(acc_ref, operand(decode_half(v >> 4), 1), xo_smem)

  dec = None if decode == "select" else _prmt_decoder(block_n, block_k)

  def kernel(slot_gmem, codes_gmem, tab_gmem, x_gmem, o_gmem, *scratch):
    s, ni, si = lax.axis_index("slot"), lax.axis_index("n"), lax.axis_index("s")
    expert = slot_gmem[0, s]
    first = si * k_steps
    a_smem = scratch[2:] if groups == 1 else scratch

    @pl.when(slot_gmem[2, s] > 0)
    def _():
      if groups == 1:
        tab_smem, bar = scratch[:2]
        plgpu.copy_gmem_to_smem(tab_gmem.at[expert, :, pl.ds(ni * block_n, block_n)], tab_smem, bar)
        plgpu.barrier_wait(bar)
      x_spec = lambda base: plgpu.BlockSpec((step_k, mp), lambda kk: (base + first + kk, 0),
                                            transforms=_transforms(mp, 16))
      if decode == "select":
        specs = [plgpu.BlockSpec((block_n, step_k), lambda kk: (ni, first + kk), transforms=_transforms(step_k, 8)),
                 x_spec(0), x_spec(k // 2 // step_k)]
        operands = [codes_gmem.at[expert], x_gmem.at[s], x_gmem.at[s]]
      else:
        specs = [plgpu.BlockSpec((block_n, block_k), lambda kk: (ni, first + kk), transforms=_transforms(block_k, 4)),
                 x_spec(0)]
        operands = [codes_gmem.at[expert], x_gmem.at[s]]
      if groups > 1:  # this step's group's codebooks
        specs.append(plgpu.BlockSpec((1, tab_rows, block_n), lambda kk: ((first + kk) * block_k // group_size, 0, ni)))
        operands.append(tab_gmem.at[expert])

      def acc_scope(acc_ref):
        fixed = load_tables(tab_smem) if groups == 1 else None

        def body(_, c_smem, *refs):
          table = fixed if groups == 1 else load_tables(refs[-1], (0,))
          x_refs = refs if groups == 1 else refs[:-1]
          if decode == "select":
            select_step(acc_ref, table, c_smem, *x_refs, a_smem)
          else:
            plgpu.wgmma(acc_ref, dec(plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X), *table), x_refs[0])
          plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(body, grid=(k_steps,), in_specs=specs, max_concurrent_steps=steps)(*operands)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)))
      o_gmem[si, s, pl.ds(ni * block_n, block_n), :] = acc.astype(o_gmem.dtype)

  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
    kwargs["interpret"] = InterpretGPUParams()
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((k_splits, slots, n, mp), out_dtype),
                   grid=(slots, n // block_n, k_splits), grid_names=("slot", "n", "s"),
                   scratch_types=([plgpu.SMEM((tab_rows, block_n), tab.dtype), plgpu.Barrier()] if groups == 1 else [])
                   + ([plgpu.SMEM((2, block_n, step_k), x.dtype)] if interpret else []), **kwargs)
  out = f(table, codes, tab, xs)  # [k_splits, slots, n, mp]
  if group_sizes is None:
    y = out[0, 0, :, :t] if k_splits == 1 else out[:, 0, :, :t].sum(0)
    return y.T.astype(x.dtype)
  # Row r: its expert's slot (the experts with rows up to it, less one) and its place in the slot.
  gs = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(gs)
  r = jnp.arange(t)
  expert_r = jnp.minimum(jnp.sum(r[:, None] >= ends[None, :], axis=1), e - 1)
  slot_r = jnp.cumsum(gs > 0)[expert_r] - 1
  y = out[:, slot_r, :, r - (ends - gs)[expert_r]]  # [t, k_splits, n]
  y = jnp.where((r < ends[-1])[:, None, None], y.astype(jnp.float32), 0).sum(1)
  return y.astype(x.dtype)


def lut_matmul_mgpu(x, packed, cents, **kw):
  """x [m, k] @ (packed uint8 [n, k/2] of 4-bit codes, cents [n, 16]) -> [m, n]: one expert of m rows."""
  return grouped_lut_matmul_mgpu(x, packed[None], cents[None], None, **kw)


def _prmt_decoder(block_n, kt):
  """An inline_mgpu function: codes uint4 [block_n, kt] (WGMMA_UPCAST_4X: a thread's word of eight
  codes of one row) and DECODE4_PTX's eight table registers of its rows -> bf16 [block_n, kt] in the
  WGMMA layout, each word's four bf16 pairs put where the layout has that thread's pairs of four
  8-column tiles (x's columns permuted to match: prmt_permutation)."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import arith, llvm  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels.decode4 import DECODE4_PTX, DECODE4_SELECTORS  # pylint: disable=g-import-not-at-top
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
      word = mgpu.utils.bitcast(codes.registers[idx], i32)
      regs = [mgpu.utils.bitcast(t.registers[table_register(idx)], i32) for t in tables]
      sel = llvm.inline_asm(i64, [word], DECODE4_SELECTORS[0], "=l,r")
      for half in range(2):
        four = llvm.inline_asm(i64, [sel, *regs], DECODE4_PTX[half], "=l,l," + ",".join(["r"] * 8))
        pairs = (arith.trunci(i32, four), arith.trunci(i32, arith.shrui(four, arith.constant(i64, 32))))
        for q, pair in enumerate(pairs):
          out[pair_register(idx, 2 * half + q)] = mgpu.utils.bitcast(pair, bf2)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode


def table_register(word_register: tuple) -> tuple:
  """The register of a rows' vector (WGMMA's row layout) holding the codebook of the row whose word
  sits at `word_register` of WGMMA_UPCAST_4X: same 64-row tile, same row half."""
  return (word_register[0], 0, word_register[4], 0, 0)


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


def _weight(packed, cents) -> CodebookWeight:
  return CodebookWeight(packed, cents.reshape(*packed.shape[:-1], -1, 16), 4, 2 * packed.shape[-1])


def reference(x, packed, cents):
  """cqjax's reference in float32, rounded to x's dtype as the kernel's float32 accumulator is."""
  return lut_matmul_reference(x.astype(jnp.float32), _weight(packed, cents)).astype(x.dtype)


def grouped_reference(x, packed, cents, group_sizes):
  return grouped_lut_matmul_reference(x.astype(jnp.float32), _weight(packed, cents), group_sizes).astype(x.dtype)


def operands(seed, m, k, n):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16),
          jnp.asarray(r.integers(0, 256, (n, k // 2)), jnp.uint8),
          jnp.asarray(r.standard_normal((n, 16)), jnp.bfloat16))


def _timed_configs(line, configs, run, check, t_base):
  """line + ' | kind config: us (speedup over t_base, max error / max |ref|)' for each config."""
  for kind, bn, bk, st, ks in configs:
    name = f"{kind} {bn},{bk},{st},{ks}"
    kw = dict(decode=kind, block_n=bn, block_k=bk, steps=st, k_splits=ks)
    try:
      err = check(kw)
      t = run(kw)
      line += f" | {name}: {t:6.1f} ({t_base / t:4.2f}x, err {err:.2g})"
    except Exception as e:  # pylint: disable=broad-except
      line += f" | {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:100]}"
  return line


def _max_rel_err(got, ref):
  ref = ref.astype(jnp.float32)
  return float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--interpret", action="store_true", help="the select decode through Mosaic GPU's interpreter (CPU)")
  ap.add_argument("--shapes", default="4096x14336,14336x4096")
  ap.add_argument("--ms", default="1,16,128")
  ap.add_argument("--group_size", type=int, default=0,
                  help="single products' codebooks over column groups of this many inputs (0: a codebook a row)")
  ap.add_argument("--grouped", default="8x2x4096x14336,128x8x2048x768", help="experts x top_k x d_in x d_out")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--configs", default="select:64,128,2,1;prmt:64,128,2,1;prmt:64,256,2,1;prmt:64,128,4,1;"
                                       "prmt:64,256,4,1;prmt:64,128,2,4;prmt:128,128,2,1;prmt:128,128,2,2",
                  help="decode:block_n,block_k,steps,k_splits;...")
  a = ap.parse_args()
  if a.interpret:
    x, p, c = operands(0, 5, 256, 64)
    packed, cents = jnp.stack([p, p ^ 0x5A, p]), jnp.stack([c, -c, 2 * c])
    gs = jnp.array([2, 0, 3], jnp.int32)
    err = _max_rel_err(grouped_lut_matmul_mgpu(x, packed, cents, gs, decode="select", interpret=True),
                       grouped_reference(x, packed, cents, gs))
    print(f"interpreted, 3 experts (one empty), 5 rows: max error / max |ref| {err:.2g}")
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mosaic_lut: timing needs a Hopper GPU; on this host, --interpret runs the select decode")
  from experiments.bench_kernels import _per_call_us as per_call_us  # pylint: disable=g-import-not-at-top
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  configs = [(c.split(":")[0], *(int(v) for v in c.split(":")[1].split(","))) for c in a.configs.split(";")]
  print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  sets = 8
  for shape in filter(None, a.shapes.split(",")):
    k, n = (int(v) for v in shape.split("x"))
    ws = [operands(i, 1, k, n)[1:] for i in range(sets)]
    if a.group_size:
      ws = [(p, jnp.asarray(np.random.default_rng(200 + i).standard_normal((n, k // a.group_size, 16)), jnp.bfloat16))
            for i, (p, _) in enumerate(ws)]
    dense = [jnp.asarray(np.random.default_rng(100 + i).standard_normal((k, n)), jnp.bfloat16) for i in range(sets)]
    for m in (int(v) for v in a.ms.split(",")):
      x = operands(1000 + m, m, k, n)[0]
      t_bf16 = per_call_us(jax.jit(lambda x, ds: [x @ d for d in ds]), (x, dense)) / sets
      t_pk = per_call_us(jax.jit(lambda x, ws: [pk.lut_matmul(x, p, c.reshape(n, -1, 16), 4) for p, c in ws]),
                         (x, ws)) / sets
      line = f"{k}x{n} M={m:<3} bf16 {t_bf16:6.1f} us  pallas-triton {t_pk:6.1f} ({t_bf16 / t_pk:4.2f}x)"
      run = lambda kw, x=x, ws=ws: per_call_us(jax.jit(lambda x, ws: [lut_matmul_mgpu(x, p, c, **kw) for p, c in ws]),
                                               (x, ws)) / sets
      check = lambda kw, x=x, ws=ws: _max_rel_err(lut_matmul_mgpu(x, *ws[0], **kw), reference(x, *ws[0]))
      print(_timed_configs(line, configs, run, check, t_bf16), flush=True)
  for spec in filter(None, a.grouped.split(",")):
    e, top_k, k, n = (int(v) for v in spec.split("x"))
    gsets = max(2, min(sets, (60 << 20) // (e * n * k // 2) + 1))  # past the 50 MB L2
    ws = [(p.reshape(e, n, k // 2), c.reshape(e, n, 16))
          for p, c in (operands(i, 1, k, n * e)[1:] for i in range(gsets))]
    dense = [jnp.asarray(np.random.default_rng(100 + i).standard_normal((e, k, n)), jnp.bfloat16) for i in range(gsets)]
    for b in (int(v) for v in a.batches.split(",")):
      scores = jax.random.uniform(jax.random.key(b), (b, e))
      gs = jnp.bincount(jax.lax.top_k(scores, top_k)[1].reshape(-1), length=e).astype(jnp.int32)
      x = operands(2000 + b, b * top_k, k, n)[0]
      t_rd = per_call_us(jax.jit(lambda x, ds, gs: [jax.lax.ragged_dot(x, d, gs) for d in ds]), (x, dense, gs)) / gsets
      t_pk = per_call_us(jax.jit(lambda x, ws, gs: [pk.grouped_lut_matmul(x, p, c.reshape(e, n, 1, 16), 4, gs)
                                                    for p, c in ws]), (x, ws, gs)) / gsets
      line = (f"grouped {e}x{n}x{k} top-{top_k} batch {b:<3} ragged_dot {t_rd:6.1f} us  pallas-triton {t_pk:6.1f} "
              f"({t_rd / t_pk:4.2f}x)")
      run = lambda kw, x=x, ws=ws, gs=gs: per_call_us(jax.jit(
          lambda x, ws, gs: [grouped_lut_matmul_mgpu(x, p, c, gs, **kw) for p, c in ws]), (x, ws, gs)) / gsets
      check = lambda kw, x=x, ws=ws, gs=gs: _max_rel_err(grouped_lut_matmul_mgpu(x, *ws[0], gs, **kw),
                                                         grouped_reference(x, *ws[0], gs))
      print(_timed_configs(line, configs, run, check, t_rd), flush=True)


if __name__ == "__main__":
  sys.exit(main())
