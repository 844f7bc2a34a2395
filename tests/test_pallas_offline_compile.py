"""experiments.pallas_offline_compile without the triton package: each product's pallas_calls are
captured as Triton IR with their launch options, and the compile step asks for triton clearly."""
import sys

import pytest

from experiments import pallas_offline_compile as poc
from pallas_kernels import lut_matmul as pk


def test_products_give_their_triton_ir_and_launch_options():
  (single,) = poc.product_kernels(1, 4096, 14336)
  want = pk.default_tuning(1, 4096, 14336, 4)
  assert single.name == "cqjax_lut_matmul" and "tt.func public @cqjax_lut_matmul" in single.ttir
  assert (single.num_warps, single.num_stages) == (want.num_warps, want.num_stages)
  assert "loc(" not in single.ttir  # no debug locations: the text Triton's parser reads
  (grouped,) = poc.product_kernels(16, 2048, 768, experts=128, top_k=8)
  assert grouped.name == "cqjax_grouped_lut_matmul" and "tt.func public @cqjax_grouped_lut_matmul" in grouped.ttir


def test_asks_for_triton(monkeypatch):
  monkeypatch.setitem(sys.modules, "triton", None)  # import fails as where it is not installed
  monkeypatch.setattr(sys, "argv", ["pallas_offline_compile", "--single=1x256x256", "--grouped="])
  with pytest.raises(SystemExit, match=r"needs the triton package: pip install triton==3.6.0"):
    poc.main()


def _sass(ops: list[str]) -> str:
  """A cuobjdump-style listing: one instruction every 16 bytes."""
  return "\n".join(f"        /*{16 * i:04x}*/                   {op} ;                 /* 0x000000000000 */"
                   for i, op in enumerate(ops))


def test_k_loop_is_the_longest_innermost_loop():
  k_body = ["LDG.E.128 R4, desc[UR4][R2.64]", "PRMT R8, R4, R5, R6", "PRMT R9, R4, R5, R7",
            "@P0 BAR.SYNC.DEFER_BLOCKING 0x0", "FFMA R10, R8, R9, R10", "FFMA R11, R8, R9, R11"]
  ops = ["MOV R1, c[0x0][0x28]",                        # 0x00
         "IADD3 R0, R0, 0x1, RZ",                       # 0x10: the row loop starts
         *k_body,                                       # 0x20-0x70: the K loop
         "@P1 BRA 0x20",                                # 0x80: its backward branch
         "STG.E desc[UR4][R2.64], R10",                 # 0x90
         "@!P2 BRA 0x10",                               # 0xa0: the row loop's, around the K loop
         "STS [R3], RZ",                                # 0xb0: a short zeroing loop
         "@P3 BRA 0xb0",                                # 0xc0
         "BRA 0xd0",                                    # 0xd0: the end's self-branch
         "EXIT"]
  got = poc.k_loop(_sass(ops))
  assert got["loop_instructions"] == len(k_body) + 1
  assert got["loop_opcodes"] == {"PRMT": 2, "FFMA": 2, "LDG": 1, "BAR": 1, "BRA": 1}


def test_k_loop_of_straight_code_is_empty():
  assert poc.k_loop(_sass(["MOV R1, c[0x0][0x28]", "EXIT"])) == {"loop_instructions": 0, "loop_opcodes": {}}


def test_tunings_read_back_as_written_and_bad_ones_are_refused():
  tunings = [pk.LutTuning(2, 16, 512, 1), pk.LutTuning(16, 64, 256, 2, num_warps=8)]
  assert poc.parse_tunings(",".join(poc.tuning_label(t) for t in tunings)) == tunings
  assert poc.parse_tunings("") == [None]  # the kernels' own
  with pytest.raises(SystemExit, match="--tunings='3/16/512/1'"):
    poc.parse_tunings("3/16/512/1")  # not a power of two
