"""experiments/profile_cuda_lut.py with the jnp reference or the interpreted Pallas kernel standing
in for the kernel (runs on any host; the GPU's own launches are what ncu profiles)."""
import sys

import jax
import pytest

from cqjax.act_quant import ActQuantConfig


def test_profile_cuda_lut_runs_the_grouped_call_per_batch_and_tuning(monkeypatch, capsys):
  """profile_cuda_lut --experts: each batch's routing, each tuning (default: the grouped one) run
  in one jitted call over two weights; here with the jnp reference standing in for the kernel."""
  from cqjax.lut_matmul import grouped_lut_matmul_int8_reference
  from cuda_kernels import lut_matmul_int8 as ck8
  from experiments import profile_cuda_lut
  calls = []

  def reference(x, packed, centroids, bits, gs, tuning=None):
    calls.append(tuning)
    return grouped_lut_matmul_int8_reference(x, packed, centroids, bits, gs)

  monkeypatch.setattr(ck8, "available", lambda: True)
  monkeypatch.setattr(ck8, "grouped_lut_matmul_int8", reference)
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--int8", "--experts=8", "--top_k=2", "--shape=64x32",
                                    "--ms=1,3", "--tunings=default,8/2"])
  profile_cuda_lut.main()
  launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("launch:")]
  assert len(launches) == 4 and "batch=1 top-2 (2 active)" in launches[0] and "batch=3" in launches[2]
  assert set(calls) == {ck8.default_tuning(1, 64, 32, grouped=True), ck8.Int8Tuning(warps=8, mt=2)}


def test_profile_cuda_lut_traces_grouped_calls_only(monkeypatch, capsys):
  """--trace=N reads the grouped call's device kernels from jax.profiler (none on the CPU, XLA's
  fusions of the reference on a GPU), and asks for --experts on a single weight."""
  from cqjax.lut_matmul import grouped_lut_matmul_int8_reference
  from cuda_kernels import lut_matmul_int8 as ck8
  from experiments import profile_cuda_lut

  monkeypatch.setattr(ck8, "available", lambda: True)
  monkeypatch.setattr(ck8, "grouped_lut_matmul_int8", lambda x, p, c, b, gs, tuning=None:
                      grouped_lut_matmul_int8_reference(x, p, c, b, gs))
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--int8", "--experts=8", "--shape=64x32", "--ms=1", "--trace=2"])
  profile_cuda_lut.main()
  out = capsys.readouterr().out
  if jax.default_backend() == "gpu":
    assert "fusion" in out and "holds no device kernels" not in out
  else:
    assert "a call of 2 weights: the trace holds no device kernels" in out
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--int8", "--shape=64x32", "--trace=2"])
  with pytest.raises(SystemExit, match="--trace profiles grouped calls"):
    profile_cuda_lut.main()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a host without a GPU")
def test_profile_cuda_lut_pallas_needs_a_gpu(monkeypatch):
  """Without a GPU --pallas stops before compiling."""
  from experiments import profile_cuda_lut

  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--pallas", "--shape=64x32", "--ms=1"])
  with pytest.raises(SystemExit, match="--pallas profiles the compiled Pallas kernel; this host has no GPU"):
    profile_cuda_lut.main()


def test_profile_cuda_lut_runs_the_pallas_kernel_per_m_and_tuning(monkeypatch, capsys):
  """--pallas: each M and tuning ("default": pallas_kernels' own) launches the Pallas kernel once,
  here interpreted (and the GPU host faked where there is none); a tuning that is not a LutTuning
  stops with its name, and --pallas with --int8 stops at the flags."""
  from experiments import profile_cuda_lut
  from pallas_kernels import lut_matmul as pk

  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--pallas", "--int8", "--shape=64x32"])
  with pytest.raises(SystemExit):
    profile_cuda_lut.main()
  assert "argument --int8: not allowed with argument --pallas" in capsys.readouterr().err
  calls, kernel = [], pk.lut_matmul

  def interpreted(x, packed, centroids, bits, tuning=None):
    calls.append((x.shape[0], tuning))
    return kernel(x, packed, centroids, bits, tuning=tuning, interpret=True)

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(pk, "lut_matmul", interpreted)
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--pallas", "--shape=64x32", "--ms=1,3",
                                    "--tunings=default,1/16/32/2/4/2"])
  profile_cuda_lut.main()
  launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("launch:")]
  assert len(launches) == 4 and "64x32 M=1 LutTuning(" in launches[0] and "M=3" in launches[2]
  assert calls == [(1, pk.default_tuning(1, 64, 32, 4)), (1, pk.LutTuning(1, 16, 32, 2)),
                   (3, pk.default_tuning(3, 64, 32, 4)), (3, pk.LutTuning(1, 16, 32, 2))]
  assert profile_cuda_lut.parse_pallas_tuning("default", 8, 64, 32, experts=128) == pk.default_grouped_tuning(
      8, 128, 64, 32, 4)
  with pytest.raises(SystemExit, match="tuning '3/16/32' is not block_m/.*power of two"):
    profile_cuda_lut.parse_pallas_tuning("3/16/32", 1, 64, 32)


def test_profile_cuda_lut_runs_the_bitplane_kernel_per_columns_a_warp(monkeypatch, capsys):
  """--bitplane: the grouped call runs per batch and tuning, a tuning being the kernel's output
  columns a warp (default: 0, the kernel's choice), on the weights as stored or (--laid_out) as
  bitplane_layout lays them out, with (--affine) the default activation quantizer; anything else
  stops with its name."""
  from cqjax.lut_matmul import grouped_lut_matmul_int8_reference
  from cuda_kernels import lut_matmul_bitplane as ckb
  from experiments import profile_cuda_lut
  calls, codebook_dtypes, acts = [], set(), set()

  def reference(x, packed, centroids, bits, gs, per_warp, act):
    calls.append((x.shape[0], per_warp))
    codebook_dtypes.add(str(centroids.dtype))
    acts.add(act)
    return grouped_lut_matmul_int8_reference(x, packed, centroids, bits, gs)

  monkeypatch.setattr(ckb, "available", lambda: True)
  monkeypatch.setattr(ckb, "grouped_lut_matmul_bitplane", reference)
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--bitplane", "--experts=8", "--shape=256x32", "--ms=1,3",
                                    "--tunings=default,2"])
  profile_cuda_lut.main()
  launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("launch:")]
  assert len(launches) == 4 and launches[0].endswith(" 0") and launches[1].endswith(" 2")
  assert calls == [(2, 0), (2, 0), (2, 2), (2, 2), (6, 0), (6, 0), (6, 2), (6, 2)]
  assert codebook_dtypes == {"bfloat16"}
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--bitplane", "--laid_out", "--experts=8", "--shape=256x32",
                                    "--ms=1"])
  profile_cuda_lut.main()
  assert codebook_dtypes == {"bfloat16", "int32"} and acts == {None}
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--bitplane", "--laid_out", "--affine", "--experts=8",
                                    "--shape=256x32", "--ms=1"])
  profile_cuda_lut.main()
  assert codebook_dtypes == {"bfloat16", "int32", "uint32"} and acts == {None, ActQuantConfig()}
  for flag in ("--laid_out", "--affine"):
    monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--int8", flag, "--experts=8", "--shape=256x32"])
    with pytest.raises(SystemExit, match="--laid_out and --affine are the bit-plane kernel's; give --bitplane"):
      profile_cuda_lut.main()
  monkeypatch.setattr(sys, "argv", ["profile_cuda_lut", "--bitplane", "--experts=8", "--shape=256x32", "--tunings=8/2"])
  with pytest.raises(SystemExit, match="a bit-plane tuning is its output columns a warp, 1 to 64; got '8/2'"):
    profile_cuda_lut.main()
