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
