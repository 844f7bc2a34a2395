"""experiments/bench_expert_slots.py without a GPU: XLA's slots standing in for the CUDA kernel."""
import json
import sys


def test_bench_expert_slots_times_both_and_reads_their_kernels(monkeypatch, capsys, tmp_path):
  from cqjax import codebook
  from cuda_kernels import expert_slots as ces
  from experiments import bench_expert_slots

  monkeypatch.setattr(ces, "available", lambda: True)
  monkeypatch.setattr(ces, "expert_slots", codebook.expert_slots)
  monkeypatch.setattr(bench_expert_slots, "CASES", ((8, 2, 1), (128, 8, 16)))
  out = tmp_path / "slots.json"
  monkeypatch.setattr(sys, "argv", ["bench_expert_slots", "--sets=3", f"--out={out}"])
  bench_expert_slots.main()
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("experts=")]
  assert len(lines) == 2 and "slots=128" in lines[1]
  rows = json.loads(out.read_text())
  assert [(r["experts"], r["batch"], r["sets"]) for r in rows] == [(8, 1, 3), (128, 16, 3)]
  assert all(r["xla_us"] > 0 and r["cuda_us"] > 0 and r["xla_kernels"] == 0 for r in rows)  # no device kernels on a CPU


def test_bench_expert_slots_refuses_without_the_kernel(monkeypatch):
  import pytest
  from cuda_kernels import expert_slots as ces
  from experiments import bench_expert_slots

  monkeypatch.setattr(ces, "available", lambda: False)
  monkeypatch.setattr(sys, "argv", ["bench_expert_slots"])
  with pytest.raises(SystemExit, match="needs a CUDA GPU and the built library"):
    bench_expert_slots.main()
