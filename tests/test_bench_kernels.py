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

