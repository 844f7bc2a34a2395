"""The byte-permute decode of 4-bit codes against bf16 codebooks, as inline PTX that any backend
can emit: Pallas' Triton kernels (pallas_kernels/lut_matmul.py, elementwise_inline_asm) and the
Mosaic GPU kernels (lut_matmul_mgpu.py, inline_mgpu). No backend is imported here, so
these outlive Pallas' Triton backend (deprecated in jax 0.11)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Decodes a uint32 word of eight 4-bit codes against a row's 16-entry bf16 codebook held in eight
# registers: L0-L3 hold the entries' low bytes (entry i in byte i%4 of L[i//4]), H0-H3 the high
# bytes. A DECODE4_SELECTORS program turns the word (shifted right by 0 or 16) into two selector
# words, a nibble a code: the code's low three bits (c & 7) and 0x3210 + 4 * bit3. A DECODE4_PTX
# program then decodes four codes, those of selector bits 0-15 (or 16-31: the second program; prmt
# reads a selector's low 16 bits): `prmt` picks bytes out of a register pair by the 3-bit selectors
# from entries 0-7 and from 8-15, a second `prmt` chooses per byte by bit 3, a third interleaves
# low and high bytes into bf16 pairs. Operands: $0 the four bf16 values as one 64-bit register
# (code j in bits 16j..16j+15), $1 the selectors (64-bit), $2-$5 L0-L3, $6-$9 H0-H3. (One result
# per asm: Pallas' Triton lowering takes only single-result asm.) Selectors for a whole word at once take 6
# instructions a word, not 9 (offline compile, sm_90, 4096x14336: K loop 362 -> 338 at one row); prefill's
# 128-row blocks select per half, as they held twice the spills otherwise (216 -> 416 bytes).
_DECODE4_SELECTORS = """{{
  .reg .b32 %s, %t, %w;
  shr.b32 %w, $1, {shift};
  and.b32 %s, %w, 0x77777777;
  shr.b32 %t, %w, 1;
  and.b32 %t, %t, 0x44444444;
  or.b32 %t, %t, 0x32103210;
  mov.b64 $0, {{%s, %t}};
}}"""
DECODE4_SELECTORS = tuple(_DECODE4_SELECTORS.format(shift=shift) for shift in (0, 16))
_DECODE4_HALF = """{{
  .reg .b32 %s, %t, %a, %b, %l, %h;
  mov.b64 {{%s, %t}}, $1;{shifts}
  prmt.b32 %a, $2, $3, %s;
  prmt.b32 %b, $4, $5, %s;
  prmt.b32 %l, %a, %b, %t;
  prmt.b32 %a, $6, $7, %s;
  prmt.b32 %b, $8, $9, %s;
  prmt.b32 %h, %a, %b, %t;
  prmt.b32 %a, %l, %h, 0x5140;
  prmt.b32 %b, %l, %h, 0x7362;
  mov.b64 $0, {{%a, %b}};
}}"""
DECODE4_PTX = (_DECODE4_HALF.format(shifts=""),
               _DECODE4_HALF.format(shifts="\n  shr.b32 %s, %s, 16;\n  shr.b32 %t, %t, 16;"))


def decode4_registers(books: list) -> list:
  """Sixteen same-shape float arrays (entry i of each codebook), rounded to bf16 here -> the eight
  uint32 registers L0-L3, H0-H3 of DECODE4_PTX. Elementwise, so a kernel can build them from its
  rows' centroids in place (no pass over the codebooks before the launch; _Layout.tables_in_kernel)."""
  bits16 = [jax.lax.bitcast_convert_type(b.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32) for b in books]
  planes = [b & 0xFF for b in bits16] + [b >> 8 for b in bits16]  # low bytes of entries 0-15, then high
  return [planes[4 * r] | (planes[4 * r + 1] << 8) | (planes[4 * r + 2] << 16) | (planes[4 * r + 3] << 24)
          for r in range(8)]
