"""Report figures of the main job (matplotlib, written as PNG next to report.json)."""
from __future__ import annotations


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_rotation_outliers(per_layer: list[dict], variants: list[str], path: str) -> None:
  """Per layer max|x|/RMS and 4-bit quantization MSE of the norm outputs, one line per variant."""
  plt = _pyplot()

  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
  for col, source in enumerate(("attn_input", "mlp_input")):
    rows = [r for r in per_layer if r["source"] == source]
    layers = [r["layer"] for r in rows]
    for v in variants:
      axes[0, col].plot(layers, [r["max_over_rms"][v] for r in rows], marker="o", label=v)
      axes[1, col].plot(layers, [r["mse"][v] for r in rows], marker="o", label=v)
    axes[0, col].set_title(f"{source}: max |x| / RMS")
    axes[1, col].set_title(f"{source}: activation quantization MSE")
    axes[1, col].set_yscale("log")
    axes[1, col].set_xlabel("layer")
    for ax in axes[:, col]:
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  _save(plt, fig, path)


def plot_accf_losses(history: dict[str, list[float]], path: str) -> None:
  """ACCF block loss per epoch relative to its K-means start, one line per layer, one panel per
  block kind (q/k/v/o projections, MoE or MLP block)."""
  plt = _pyplot()

  kinds = sorted({block.split("/", 1)[1] for block in history})
  fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2), sharey=True, squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for block, losses in history.items():
      if block.split("/", 1)[1] == kind and losses and losses[0] > 0:
        ax.plot(range(len(losses)), [v / losses[0] for v in losses], marker=".", label=block.split("/")[0])
    ax.set_title(kind)
    ax.set_xlabel("epoch (0 = K-means start)")
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("block loss / start")
  axes[0, 0].legend(fontsize=7)
  _save(plt, fig, path)


def plot_centroid_histograms(centroids: dict, path: str) -> None:
  """Histogram of every centroid value of a few codebook matrices (name -> centroids array)."""
  plt = _pyplot()
  import numpy as np  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(centroids), figsize=(3.6 * len(centroids), 3.0), squeeze=False)
  for ax, (name, values) in zip(axes[0], centroids.items()):
    v = np.asarray(values, np.float32).reshape(-1)
    ax.hist(v, bins=80, color="tab:blue", alpha=0.8)
    ax.set_yscale("log")
    ax.set_title(f"{name}\n{v.size:,} centroids, {values.shape[-1]} per codebook", fontsize=8)
    ax.grid(alpha=0.3)
  _save(plt, fig, path)


_KERNEL_LINES = (("", "Pallas"), ("cuda_", "CUDA, bf16 numerics"), ("int8_", "CUDA, int8 numerics"))


def _log2_ticks(plt, ax, ticks) -> None:
  ax.set_xscale("log", base=2)
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.xaxis.set_minor_locator(plt.NullLocator())
  ax.grid(alpha=0.3)


def _decode_panel(plt, ax, rows: list[dict]) -> None:
  """bench_kernels --decode's rows: each setting's tokens/s against the decode batch, one line per
  architecture, activation bits and scope, fusion and setting."""
  run_of = lambda r: (r["arch"], r.get("act_bits"), r.get("act_scope"), r.get("fused", False))
  for run in dict.fromkeys(map(run_of, rows)):
    arch, bits, scope, fused = run
    mine = [r for r in rows if run_of(r) == run]
    fusion = ", fused" if fused else ""
    for key in dict.fromkeys(k for r in mine for k in r if k.endswith("_tokens_per_s")):
      setting = key.removesuffix("_tokens_per_s")
      quantized = f", W4A{bits} {scope}" if bits and setting != "bf16" else ""  # bf16 stays unquantized
      pts = sorted((r["batch"], r[key]) for r in mine if key in r)
      ax.plot(*zip(*pts), marker="o", label=f"{arch}{quantized}{fusion}: {setting}")
  _log2_ticks(plt, ax, sorted({r["batch"] for r in rows}))
  ax.set_xlabel("decode batch")
  ax.set_ylabel("tokens/s")
  ax.legend(fontsize=7)


def plot_kernel_speedups(result: dict, path: str) -> None:
  """bench_kernels' result: each kernel's speedup over XLA bf16 of the same run, single weights
  against the rows of x and grouped experts against the decode batch, one line per shape and
  kernel measured (1x dashed); where the run decoded (--decode), each setting's tokens/s against the
  decode batch. Panels without rows are left out (both kernel panels where the run has none)."""
  plt = _pyplot()
  kernel_panels = [(result.get("single", []), "m", "speedup_vs_bf16", "rows of x (M)", "over XLA bf16 dot"),
                   (result.get("grouped", []), "batch", "speedup_vs_ragged", "decode batch", "over XLA bf16 ragged_dot")]
  decode = result.get("decode", [])
  if any(p[0] for p in kernel_panels) or decode:
    kernel_panels = [p for p in kernel_panels if p[0]]
  panels = len(kernel_panels) + bool(decode)
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
  for ax, (rows, x_key, suffix, xlabel, versus) in zip(axes[0], kernel_panels):
    shapes, ys = dict.fromkeys((r.get("name", ""), r["k"], r["n"]) for r in rows), []
    for name, k, n in shapes:
      mine = [r for r in rows if (r.get("name", ""), r["k"], r["n"]) == (name, k, n)]
      for prefix, kernel in _KERNEL_LINES:
        pts = sorted((r[x_key], r[prefix + suffix]) for r in mine if prefix + suffix in r)
        if pts:
          ax.plot(*zip(*pts), marker="o", label=f"{name + ' ' if name else ''}{k}x{n}, {kernel}")
          ys += [y for _, y in pts]
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    _log2_ticks(plt, ax, sorted({r[x_key] for r in rows}))
    if ys and max(ys) > 4 * min(ys):  # wide ranges (grouped experts: 2-50x) on a log scale
      ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"speedup {versus}")
    if rows:
      ax.legend(fontsize=7)
  if decode:
    _decode_panel(plt, axes[0][-1], decode)
  what = "codebook matmul" if kernel_panels else "decode"
  fig.suptitle(f"{what} on {result.get('device', '?')} (jax {result.get('jax', '?')})", fontsize=10)
  _save(plt, fig, path)
