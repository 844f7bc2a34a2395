"""The main job: python -m experiments.run --config=tiny.py [--config.key=value ...].

Bare config names resolve in experiments/configs/. Stages (`--config.stages=`, comma-separated,
run in this order):
  eval    full-precision perplexity on every text in `eval_texts`, and a short greedy sample;
  rotate  calibrate, fold norms, learn R1 (AOS) and compare W16A4 perplexity with no rotation,
          a random Hadamard R1 and the learned R1 (plus per-layer activation statistics and a plot).
Writes `<output_dir>/report.json`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from ml_collections import config_flags

from cqjax.errors import CqjaxError

STAGES = ("eval", "rotate")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a name in experiments/configs/ or a path).")


def resolve_config_arg(argv: list[str]) -> list[str]:
  """Rewrites `--config=tiny.py` to the file in experiments/configs/ when no such path exists."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      name = a.split("=", 1)[1]
      if not os.path.exists(name) and os.path.exists(os.path.join(CONFIG_DIR, name)):
        a = "--config=" + os.path.join(CONFIG_DIR, name)
    out.append(a)
  return out


def write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _validate(cfg) -> list[str]:
  stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise CqjaxError(f"--config.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
  if cfg.dtype not in ("float32", "bfloat16", "float16"):
    raise CqjaxError(f"--config.dtype: {cfg.dtype!r} is not one of float32, bfloat16, float16")
  if cfg.seqlen < 2:
    raise CqjaxError(f"--config.seqlen: must be at least 2, got {cfg.seqlen}")
  if not cfg.model_path:
    raise CqjaxError("--config.model_path: no checkpoint directory given")
  return [s for s in STAGES if s in stages]


def _perplexities(cfg, model, params, eval_sets, key, report):
  from cqjax.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  for name, windows in eval_sets:
    res = perplexity(model, params, windows, cfg.eval_batch_size, desc=f"{key} ppl {name}")
    report["perplexity"].setdefault(name, {})[key] = res["perplexity"]
    report["tokens"][name] = res["tokens"]
    print(f"{name}: {key} perplexity {res['perplexity']:.3f} over {res['windows']} x {cfg.seqlen} tokens")


def _rotation_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report):
  """Calibrate, fold norms, learn R1; W16A4 perplexity and activation statistics per variant."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.act_quant import ActQuantConfig  # pylint: disable=g-import-not-at-top
  from cqjax.calibrate import collect_norm_outputs  # pylint: disable=g-import-not-at-top
  from cqjax.fold_norms import fold_norms  # pylint: disable=g-import-not-at-top
  from cqjax.learn_rotation import AosConfig, initial_rotation, learn_rotation, quantization_error  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.rotate import rotate_params  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import calibration_windows  # pylint: disable=g-import-not-at-top
  from experiments.plots import plot_rotation_outliers  # pylint: disable=g-import-not-at-top

  act = ActQuantConfig(bits=cfg.act_bits)
  calib = calibration_windows(cfg.calib_text, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
  folded_cfg, folded = fold_norms(model_cfg, params)
  norm_outputs = collect_norm_outputs(MoeCausalLM(folded_cfg, dtype), folded, calib, cfg.calib_batch_size)
  aos = AosConfig(lr=cfg.aos_lr, epochs=cfg.aos_epochs, batch_size=cfg.aos_batch_size, seed=cfg.seed, act=act)
  t0 = time.perf_counter()
  learned, history = learn_rotation(norm_outputs, aos)
  report["timings"]["aos_s"] = time.perf_counter() - t0
  np.save(os.path.join(cfg.output_dir, "r1.npy"), learned)
  tag = f"w16a{cfg.act_bits}"
  rotations = {tag: None, f"hadamard_{tag}": initial_rotation(model_cfg.hidden_size, cfg.seed),
               f"learned_rotation_{tag}": learned}

  per_layer = [{"layer": s // 2, "source": ("attn_input", "mlp_input")[s % 2], "mse": {}, "max_over_rms": {}}
               for s in range(norm_outputs.shape[0])]
  quantized_model = MoeCausalLM(folded_cfg, dtype, act_quant=act)
  for key, r in rotations.items():
    r32 = jnp.eye(model_cfg.hidden_size) if r is None else jnp.asarray(r, jnp.float32)
    sq_err, amax, sq = 0.0, 0.0, 0.0
    for s in range(0, norm_outputs.shape[1], cfg.calib_batch_size):
      x = jnp.asarray(norm_outputs[:, s: s + cfg.calib_batch_size])
      y = jnp.einsum("s...d,de->s...e", x, r32).reshape(x.shape[0], -1)
      sq_err = sq_err + quantization_error(x, r32, act) * y.shape[1]
      amax = jnp.maximum(amax, jnp.max(jnp.abs(y), -1))
      sq = sq + jnp.sum(y * y, -1)
    count = norm_outputs[0].size
    for s, row in enumerate(per_layer):
      row["mse"][key] = float(sq_err[s] / count)
      row["max_over_rms"][key] = float(amax[s] / np.sqrt(sq[s] / count))
    rotated = folded if r is None else rotate_params(folded_cfg, folded, r)
    _perplexities(cfg, quantized_model, rotated, eval_sets, key, report)
  report["rotation"] = {
      "act_quant": {"bits": act.bits, "group_size": act.group_size, "symmetric": act.symmetric,
                    "scope": act.scope},
      "calibration": {"text": cfg.calib_text, "samples": cfg.calib_samples, "seqlen": cfg.calib_seqlen},
      "aos": {"lr": aos.lr, "epochs": aos.epochs, "batch_size": aos.batch_size,
              "loss_per_epoch": history,
              "orthogonality_error": float(np.abs(learned.T @ learned - np.eye(len(learned))).max())},
      "per_layer": per_layer,
  }
  try:
    plot_rotation_outliers(per_layer, list(rotations), os.path.join(cfg.output_dir, "rotation_outliers.png"))
  except ImportError:
    print("matplotlib is not installed: rotation_outliers.png not written")


def run(cfg) -> dict:
  """Runs the selected stages and returns the report (also written to output_dir)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.generate import generate  # pylint: disable=g-import-not-at-top
  from cqjax.load import load_params, load_tokenizer  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import eval_windows, read_text, tokenize  # pylint: disable=g-import-not-at-top

  stages = _validate(cfg)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.dtype]
  os.makedirs(cfg.output_dir, exist_ok=True)

  timings = {}
  t0 = time.perf_counter()
  model_cfg, params = load_params(cfg.model_path, dtype)
  tokenizer = load_tokenizer(cfg.model_path)
  model = MoeCausalLM(model_cfg, dtype)
  timings["load_s"] = time.perf_counter() - t0

  eval_sets = []
  for source in [t.strip() for t in cfg.eval_texts.split(",") if t.strip()]:
    name, text = read_text(source)
    windows = eval_windows(tokenize(tokenizer, text), cfg.seqlen, name)
    eval_sets.append((name, windows[: cfg.max_eval_windows] if cfg.max_eval_windows else windows))

  report = {"model_path": os.path.abspath(cfg.model_path), "model_type": model_cfg.model_type,
            "dtype": cfg.dtype, "seqlen": cfg.seqlen, "stages": stages, "tokens": {},
            "perplexity": {}, "timings": timings, "settings": cfg.to_dict()}
  if "eval" in stages:
    t0 = time.perf_counter()
    _perplexities(cfg, model, params, eval_sets, "fp", report)
    timings["eval_s"] = time.perf_counter() - t0
    if cfg.sample_tokens > 0:
      prompt = tokenize(tokenizer, cfg.sample_prompt)
      if len(prompt) == 0:
        raise CqjaxError("--config.sample_prompt: tokenizes to no tokens")
      new = generate(model, params, jnp.asarray(prompt[None]), cfg.sample_tokens,
                     eos_token_id=model_cfg.eos_token_id)
      sample = tokenizer.decode(np.asarray(new[0]).tolist())
      report["sample"] = {"prompt": cfg.sample_prompt, "fp": sample}
      print(f"sample (fp): {cfg.sample_prompt!r} -> {sample!r}")
  if "rotate" in stages:
    t0 = time.perf_counter()
    _rotation_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report)
    timings["rotate_s"] = time.perf_counter() - t0

  write_json_atomic(os.path.join(cfg.output_dir, "report.json"), report)
  print(f"report: {os.path.join(cfg.output_dir, 'report.json')}")
  return report


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("error: --config is required (e.g. --config=tiny.py)")
  try:
    run(_CONFIG.value)
  except CqjaxError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, argv=resolve_config_arg(sys.argv))
