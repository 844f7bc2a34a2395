"""report.json -> markdown: table layout, missing settings and the command-line entry point."""
import json
import subprocess
import sys

from experiments.report_markdown import accuracy_tables, render


def _report():
  return {"model_path": "/m", "model_type": "mixtral", "dtype": "float32", "seqlen": 64,
          "stages": ["eval", "quantize"], "tokens": {"a.txt": 640, "b.txt": 128},
          "perplexity": {"a.txt": {"fp": 10.0, "full/rtn_w4a4": 12.345, "full/kmeans_w4a4": 11.0},
                         "b.txt": {"fp": 20.0, "full/rtn_w4a4": 25.5}},
          "timings": {"load_s": 1.5, "quantize/full/rtn_w4_s": 0.5},
          "quantization": {"scopes": ["full"], "methods": ["rtn", "kmeans"], "bits": ["w4a4", "w3a4"]}}


def test_table_cells_per_text_and_missing_settings():
  md = accuracy_tables(_report())
  assert "Full precision (a.txt / b.txt): 10.00 / 20.00" in md
  assert "| RTN per row (no rotation) (`rtn`) | 12.35 / 25.50 | — |" in md
  # A setting measured on one text only shows a dash for the other.
  assert "| learned R1 + K-means per row (`kmeans`) | 11.00 / — | — |" in md


def test_render_has_timings_and_cli_matches(tmp_path):
  report = _report()
  md = render(report)
  assert "| load | 1.5 |" in md
  assert "| quantize/full/rtn_w4 | 0.5 |" in md
  path = tmp_path / "report.json"
  path.write_text(json.dumps(report))
  out = subprocess.run([sys.executable, "-m", "experiments.report_markdown", str(path)],
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == md.strip()
