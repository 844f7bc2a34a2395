"""Report figures of the main job (matplotlib, written as PNG next to report.json)."""
from __future__ import annotations


def plot_rotation_outliers(per_layer: list[dict], variants: list[str], path: str) -> None:
  """Per layer max|x|/RMS and 4-bit quantization MSE of the norm outputs, one line per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
