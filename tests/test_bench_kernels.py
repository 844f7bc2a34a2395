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


def _decode_rows():
  return [dict(arch="mixtral-layers", batch=b, fused=False, act_bits=4, act_scope="full", bf16_tokens_per_s=500.0 * b,
               codebook_w4_tokens_per_s=2600.0 * b, codebook_w4_laid_out_tokens_per_s=2900.0 * b) for b in (1, 2)]


@pytest.mark.parametrize("parts", [("single", "grouped"), ("decode",), ("single", "grouped", "decode"), ()])
def test_the_figure_has_a_panel_for_each_part_of_the_run(monkeypatch, parts):
  """Kernel speedups against M and the decode batch, and a decode run's tokens/s (bf16 labelled
  unquantized); a run with neither draws the two kernel panels empty."""
  from experiments import plots  # pylint: disable=g-import-not-at-top
  figures = []
  monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig))
  result = {**_result(), "decode": _decode_rows()}
  plots.plot_kernel_speedups({k: v for k, v in result.items() if k not in ("single", "grouped", "decode") or k in parts},
                             "unused.png")
  (fig,) = figures
  axes = fig.axes
  kernels = "single" in parts or not parts
  assert [ax.get_xlabel() for ax in axes] == ["rows of x (M)", "decode batch"] * kernels + ["decode batch"] * ("decode" in parts)
  if "decode" in parts:
    assert [line.get_label() for line in axes[-1].get_lines()] == [
        "mixtral-layers: bf16", "mixtral-layers, W4A4 full: codebook_w4", "mixtral-layers, W4A4 full: codebook_w4_laid_out"]
    assert fig._suptitle.get_text().startswith("codebook matmul" if "single" in parts else "decode")


def test_replot_needs_a_plot_path(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", ["bench_kernels", f"--replot={tmp_path / 'bench.json'}"])
  with pytest.raises(SystemExit, match="--replot needs --plot"):
    bench_kernels.main()


@pytest.mark.parametrize("experts,top_k,k,n,want", [(128, 8, 2048, 768, 17), (128, 8, 768, 2048, 16), (8, 2, 4096, 14336, 8)])
def test_grouped_calls_read_past_the_l2_at_batch_one(experts, top_k, k, n, want):
  import jax  # pylint: disable=g-import-not-at-top
  routings = [bench_kernels.random_routing(jax.random.key(b), b, experts, top_k) for b in (1, 16)]
  # batch 1 reads top_k experts: twice the 50 MB L2 over their codes and bf16 codebooks, at least 8 sets
  assert bench_kernels.grouped_sets(routings, k, n, 8) == want == max(8, -(-100 * 2**20 // (top_k * n * (k // 2 + 32))))


def test_grouped_sweep_starts_at_the_kernels_own_choice_and_tries_both_block_kinds():
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  for t, experts, k, n in ((128, 128, 2048, 768), (128, 128, 768, 2048), (32, 8, 4096, 14336)):
    cands = bench_kernels.grouped_sweep_candidates(t, experts, k, n)
    assert cands[0] == pk.default_grouped_tuning(t, experts, k, n, bench_kernels.BITS)
    assert len(set(cands)) == len(cands) and {c.block_m for c in cands} == {1, 2, 4, 16}
    assert all(c.k_splits <= -(-k // c.block_k) for c in cands)  # every K split has steps to run
  assert {c.block_m for c in bench_kernels.sweep_candidates(3, 4096, 14336)} == {16, 4}  # tensor cores, FMA
  assert {c.block_m for c in bench_kernels.sweep_candidates(1, 4096, 14336)} == {1, 16}  # FMA, tensor cores
  # Tensor-core decode blocks are also tried with deeper pipelines; one-row blocks (no staged loads) are not
  base = pk.default_tuning(16, 4096, 14336, bench_kernels.BITS)
  assert {c.num_stages for c in bench_kernels.sweep_candidates(16, 4096, 14336) if c.block_m == base.block_m
          and c.block_n == base.block_n and c.block_k == base.block_k} >= {base.num_stages, 3, 4}
  assert {c.num_stages for c in bench_kernels.grouped_sweep_candidates(32, 8, 4096, 14336)} >= {2, 3, 4}
  assert {c.num_stages for c in bench_kernels.sweep_candidates(1, 4096, 14336)} == {2}
  assert {c.num_stages for c in bench_kernels.grouped_sweep_candidates(2, 8, 4096, 14336)} == {2}


def test_decode_settings_keep_the_bf16_baseline_and_refuse_unknown_names(monkeypatch):
  assert [s[0] for s in bench_kernels.decode_settings("codebook_w4")] == ["bf16", "codebook_w4"]
  assert bench_kernels.decode_settings("all", act_bits=4) == bench_kernels.DECODE_SETTINGS
  # Without quantized activations the unfused setting is the default one's program (not timed
  # twice), and nothing reads the laid-out setting's layout (refused when named).
  assert [s[0] for s in bench_kernels.decode_settings("all")] == [
      s[0] for s in bench_kernels.DECODE_SETTINGS if s[0] not in ("codebook_w4_unfused", "codebook_w4_laid_out")]
  assert [s[0] for s in bench_kernels.decode_settings("codebook_w4_unfused")] == ["bf16", "codebook_w4_unfused"]
  with pytest.raises(SystemExit, match=r"codebook_w4_laid_out lays weights out .* \(--decode_act_bits"):
    bench_kernels.decode_settings("codebook_w4_laid_out")
  monkeypatch.setattr(sys, "argv", ["bench_kernels", "--decode", "--decode_settings=codebook_w4,pallas"])
  with pytest.raises(SystemExit, match="unknown decode setting 'pallas'"):
    bench_kernels.main()


def test_decode_architectures_have_the_shapes_they_name():
  """--decode_arch=qwen3-layers: Qwen3-30B-A3B's expert and attention shapes (the dispatcher's
  choices differ there from the small architecture's), mixtral-layers Mixtral-8x7B's; an unknown
  name is refused."""
  small, qwen3, mixtral = (bench_kernels.decode_arch_config(a) for a in bench_kernels.DECODE_ARCHS)
  assert small.model_type == "mixtral" and qwen3.model_type == "qwen3_moe" and mixtral.model_type == "mixtral"
  assert (mixtral.hidden_size, mixtral.moe_intermediate_size, mixtral.num_experts, mixtral.top_k) == (4096, 14336, 8, 2)
  assert (mixtral.num_heads * mixtral.head_dim, mixtral.num_kv_heads * mixtral.head_dim) == (4096, 1024)
  assert (qwen3.hidden_size, qwen3.moe_intermediate_size, qwen3.num_experts, qwen3.top_k) == (2048, 768, 128, 8)
  assert (qwen3.num_heads * qwen3.head_dim, qwen3.num_kv_heads * qwen3.head_dim, qwen3.dense_layers) == (4096, 512, ())
  with pytest.raises(SystemExit, match="unknown decode architecture 'qwen3'"):
    bench_kernels.decode_arch_config("qwen3")
