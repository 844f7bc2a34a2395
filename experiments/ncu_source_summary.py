"""Where a kernel's warps wait, per SASS instruction, from ncu's source page:

  ncu --section SourceCounters -o rep ...; ncu -i rep.ncu-rep --page source --print-source sass --csv > src.csv
  python3 -m experiments.ncu_source_summary src.csv [--top=12] [--launch=-1]

Prints the stall samples grouped by how often an instruction ran (a warp-level count: the hot loop
runs most, per-tile work less, a warp's set-up once), the stall reasons over all samples, then the
instructions with the most samples and their main reasons. Samples are a statistical picture of where warps sit, not a cost:
at a kernel's start every warp waits on its first loads wherever those are consumed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io


@dataclasses.dataclass(frozen=True)
class Instruction:
  address: int
  source: str
  executed: int  # warp-level instructions executed
  samples: int
  stalls: dict[str, int]  # reason -> samples (not-issued and issued)


def _number(text: str) -> int:
  return int(float(text.replace(",", ""))) if text.strip() not in ("", "-") else 0


def launches(text: str) -> list[str]:
  """One page a profiled launch: ncu writes each after a line naming its kernel."""
  pages, page = [], []
  for line in text.splitlines():
    if line.startswith('"Kernel Name"') and page:
      pages.append("\n".join(page))
      page = []
    page.append(line)
  return pages + ["\n".join(page)]


def parse(text: str) -> list[Instruction]:
  """The rows of one launch's source page (the first line names the kernel, the second the columns)."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith('"Address"')), None)
  if start is None:
    raise SystemExit("ncu_source_summary: no 'Address' header: not ncu's --page source --csv output")
  rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
  header, body = rows[0], rows[1:]
  col = {name: i for i, name in enumerate(header)}
  missing = [c for c in ("Address", "Source", "Instructions Executed", "# Samples") if c not in col]
  if missing:
    raise SystemExit(f"ncu_source_summary: columns {missing} missing (collect with --section SourceCounters)")
  reasons = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
  out = []
  for r in body:
    if len(r) != len(header):
      continue
    out.append(Instruction(int(r[col["Address"]], 0), r[col["Source"]].strip(), _number(r[col["Instructions Executed"]]),
                           _number(r[col["# Samples"]]),
                           {c.removeprefix("stall_"): _number(r[col[c]]) for c in reasons if _number(r[col[c]])}))
  return out


def by_count(insts: list[Instruction]) -> list[tuple[int, int, int]]:
  """(executions, instructions, samples) for each distinct execution count, most samples first."""
  groups: dict[int, list[int]] = {}
  for i in insts:
    if i.executed:
      g = groups.setdefault(i.executed, [0, 0])
      g[0] += 1
      g[1] += i.samples
  return sorted(((n, k, s) for n, (k, s) in groups.items()), key=lambda t: -t[2])


def summary(insts: list[Instruction], top: int = 12) -> str:
  total = sum(i.samples for i in insts)
  lines = [f"{total} samples over {sum(i.executed for i in insts):,} instructions executed"]
  lines.append("executions  instructions  samples  share")
  for n, k, s in by_count(insts)[:8]:
    lines.append(f"{n:10d}  {k:12d}  {s:7d}  {100 * s / max(total, 1):4.1f}%")
  reasons: dict[str, int] = {}
  for i in insts:
    for r, v in i.stalls.items():
      reasons[r] = reasons.get(r, 0) + v
  lines.append("reasons: " + ", ".join(f"{r} {100 * v / max(total, 1):.1f}%"
                                       for r, v in sorted(reasons.items(), key=lambda t: -t[1])[:8]))
  lines.append(f"top {top} instructions by samples:")
  for i in sorted(insts, key=lambda i: -i.samples)[:top]:
    reasons = ", ".join(f"{r} {v}" for r, v in sorted(i.stalls.items(), key=lambda t: -t[1])[:3])
    lines.append(f"  {i.address:#x} x{i.executed:<7d} {i.samples:5d} ({100 * i.samples / max(total, 1):4.1f}%) "
                 f"{i.source[:48]:48s} {reasons}")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("csv", help="ncu -i REP --page source --print-source sass --csv output")
  ap.add_argument("--top", type=int, default=12, help="instructions listed")
  ap.add_argument("--launch", type=int, default=-1, help="which profiled launch (Python index; default the last)")
  args = ap.parse_args()
  with open(args.csv) as f:
    pages = launches(f.read())
  if not -len(pages) <= args.launch < len(pages):
    raise SystemExit(f"ncu_source_summary: --launch={args.launch}, but {args.csv} holds {len(pages)} launches")
  if len(pages) > 1:
    print(f"launch {args.launch % len(pages)} of {len(pages)}")
  print(summary(parse(pages[args.launch]), args.top))


if __name__ == "__main__":
  main()
