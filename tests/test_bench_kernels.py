"""experiments/bench_kernels.py without a GPU: its figure drawn again from a saved result."""
import json
import sys

import pytest

from experiments import bench_kernels


def _result():
  single = [dict(k=4096, n=14336, m=m, bf16_us=30.0, speedup_vs_bf16=1.5, int8_speedup_vs_bf16=s)
            for m, s in ((1, 1.7), (16, 1.6), (128, 1.0))]
  grouped = [dict(name="mixtral", k=4096, n=14336, batch=b, int8_speedup_vs_ragged=s) for b, s in ((1, 6.9), (16, 2.3))]
  return {"device": "test", "jax": "0", "copy_gbs": 1.0, "single": single, "grouped": grouped}


def test_replot_draws_a_saved_run(tmp_path, monkeypatch):
  saved, png = tmp_path / "bench.json", tmp_path / "speedups.png"
  saved.write_text(json.dumps(_result()))
  monkeypatch.setattr(sys, "argv", ["bench_kernels", f"--replot={saved}", f"--plot={png}"])
  bench_kernels.main()
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_needs_a_plot_path(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["bench_kernels", f"--replot={tmp_path / 'bench.json'}"])
  with pytest.raises(SystemExit, match="--replot needs --plot"):
    bench_kernels.main()


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
