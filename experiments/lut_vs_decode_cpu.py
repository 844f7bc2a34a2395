"""Builds and runs lut_vs_decode_cpu.cc: decode-to-register against accumulate-by-code (LUT) at
M = 1 on 4096x14336 4-bit codes, on this CPU (needs g++ and AVX-512 VBMI).

  python -m experiments.lut_vs_decode_cpu   # writes experiments/results/bench-cpu/lut_vs_decode.json
"""
import json
import os
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  with tempfile.TemporaryDirectory() as tmp:
    exe = os.path.join(tmp, "lut_vs_decode")
    subprocess.run(["g++", "-O3", "-std=c++17", "-pthread", os.path.join(HERE, "lut_vs_decode_cpu.cc"), "-o", exe],
                   check=True)
    result = json.loads(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)
  out = os.path.join(HERE, "results", "bench-cpu", "lut_vs_decode.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"M=1 4096x14336 4-bit: decode-to-register {result['decode_ms']:.3f} ms, accumulate-by-code (LUT) "
        f"{result['lut_ms']:.3f} ms ({result['lut_ms'] / result['decode_ms']:.1f}x slower); max rel err "
        f"{result['decode_max_rel_err']:.1e} / {result['lut_max_rel_err']:.1e}")


if __name__ == "__main__":
  main()
