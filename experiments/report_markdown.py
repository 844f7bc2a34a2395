"""report.json -> report.md: the accuracy table per scope (method x bit setting) and stage times.

The run writes `report.md` beside `report.json`; `python -m experiments.report_markdown REPORT.json`
prints the same markdown (how BENCHMARKS.md's tables are made).
"""
from __future__ import annotations

import json
import math
import sys

METHOD_LABELS = {
    "rtn": "RTN per row (no rotation)",
    "rtn_g128": "RTN group 128 (no rotation)",
    "hadamard_rtn": "Hadamard R1 + RTN (QuaRot-style)",
    "learned_rotation_rtn": "learned R1 + RTN (SpinQuant-style)",
    "kmeans": "learned R1 + K-means per row",
    "codequant": "CodeQuant: learned R1 + K-means per row + ACCF",
    "kmeans_group": "learned R1 + K-means, column groups",
    "kmeans_pog": "learned R1 + POG + K-means, column groups",
    "codequant_pog": "CodeQuant with POG, column groups + ACCF",
}


def _cell(report: dict, key: str) -> str:
  values = [report["perplexity"][text].get(key) for text in report["perplexity"]]
  if all(v is None for v in values):
    return "—"
  return " / ".join("—" if v is None or not math.isfinite(v) else f"{v:.2f}" for v in values)


def accuracy_tables(report: dict) -> str:
  """One table per scope: rows are methods, columns bit settings, cells perplexity per text."""
  quant = report.get("quantization")
  texts = " / ".join(report["perplexity"])
  lines = []
  if any("fp" in v for v in report["perplexity"].values()):
    lines.append(f"Full precision ({texts}): {_cell(report, 'fp')}\n")
  if not quant:
    return "\n".join(lines)
  for scope in quant["scopes"]:
    lines.append(f"**scope `{scope}`** (perplexity {texts})\n")
    lines.append("| method | " + " | ".join(quant["bits"]) + " |")
    lines.append("| --- |" + " --- |" * len(quant["bits"]))
    for method in quant["methods"]:
      cells = [_cell(report, f"{scope}/{method}_{bits}") for bits in quant["bits"]]
      lines.append(f"| {METHOD_LABELS.get(method, method)} (`{method}`) | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def timing_table(report: dict) -> str:
  rows = [f"| {name.removesuffix('_s')} | {seconds:.1f} |" for name, seconds in report.get("timings", {}).items()]
  return "\n".join(["| stage | seconds |", "| --- | --- |", *rows]) if rows else ""


def render(report: dict) -> str:
  head = [f"# cqjax run: {report.get('model_path', '?')}", "",
          f"Model type `{report.get('model_type', '?')}`, compute {report.get('dtype', '?')}, "
          f"seqlen {report.get('seqlen', '?')}, stages {', '.join(report.get('stages', []))}; "
          "evaluation tokens: " + ", ".join(f"{k} {v:,}" for k, v in report.get("tokens", {}).items()) + ".", ""]
  sample = report.get("sample", {})
  for kind in ("fp", "quantized"):
    if kind in sample:
      head += [f"Sample ({kind}): `{sample['prompt']}` → `{sample[kind]}`", ""]
  body = [accuracy_tables(report)]
  if "export" in report:
    e = report["export"]
    key = f"export/{e['scope']}/{e['bits']}"
    body.append(f"Exported model (`{e['path']}`, scope `{e['scope']}`, {e['bits']}, group size {e['group_size']}, "
                f"reloaded from disk): {_cell(report, key)}\n")
  body += ["## Stage times", "", timing_table(report), ""]
  return "\n".join(head + ["## Perplexity", ""] + body)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m experiments.report_markdown REPORT.json", file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    print(render(json.load(f)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
