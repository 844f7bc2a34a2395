"""The main job: python -m experiments.run --config=tiny.py [--config.key=value ...].

Bare config names resolve in experiments/configs/. Stages (`--config.stages=`, comma-separated,
run in this order):
  eval    full-precision perplexity on every text in `eval_texts`, and a short greedy sample;
  rotate  calibrate, fold norms, learn R1 (AOS) and compare W16A4 perplexity with no rotation,
          a random Hadamard R1 and the learned R1 (plus per-layer activation statistics and a plot);
  quantize  weight quantization in each scope (`quant_scopes`) with each method
          (`quant_methods`: rtn, rtn_g128, hadamard_rtn, learned_rotation_rtn, kmeans, codequant,
          and the column-group variants kmeans_group, kmeans_pog, codequant_pog) at each setting (`quant_bits`: e.g. w4a16, w4a4, w3a4); keys `<scope>/<method>_<bits>`;
  export  the model to serve (with `layer_streaming`, from weights kept in host memory, one
          layer on the device at a time: for models larger than the device): CodeQuant at `export_bits` in `export_scope` (column groups + POG
          when `export_group_size` > 0) through `cqjax.quantize`, written to `<output_dir>/export`
          by `cqjax.export_quantized`, reloaded with `cqjax.load_quantized` for its perplexity
          (key `export/<scope>/<bits>`) and a greedy sample.
Writes `<output_dir>/report.json` and `report.md` (rewritten after every measured perplexity).

Resume: re-running the same command continues where a killed run stopped: measured settings are
kept from report.json, R1 and the export stage's K-means codebooks and ACCF layers come from
`<output_dir>/state/`. A run whose settings differ from the ones recorded in the output directory
is refused with the differences; `--config.resume=False` starts over.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, logging
from ml_collections import config_flags

from cqjax.checkpoint import settings_differences, write_text_atomic
from cqjax.errors import CqjaxError

STAGES = ("eval", "rotate", "quantize", "export")
# Settings that may change between a run and its resumption (where the weights live does not
# change the result).
RESUMABLE_CHANGES = ("stages", "resume", "layer_streaming")
METHODS = ("rtn", "rtn_g128", "hadamard_rtn", "learned_rotation_rtn", "kmeans", "codequant",
           "kmeans_group", "kmeans_pog", "codequant_pog")
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


def write_report(cfg, report: dict) -> None:
  """report.json and its markdown rendering, each replaced atomically (a run cut off keeps both)."""
  from experiments.report_markdown import render  # pylint: disable=g-import-not-at-top

  write_text_atomic(os.path.join(cfg.output_dir, "report.json"), json.dumps(report, indent=2))
  write_text_atomic(os.path.join(cfg.output_dir, "report.md"), render(report))


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
  if cfg.layer_streaming and set(stages) - {"export"}:
    raise CqjaxError(f"--config.layer_streaming: only the export stage streams layers (the weights stay in host "
                     f"memory); stages {sorted(set(stages) - {'export'})} need the whole model on the device")
  if "quantize" in stages:
    _quant_settings(cfg)
  if "export" in stages:
    from cqjax.quantize_weights import SCOPES  # pylint: disable=g-import-not-at-top
    if cfg.export_scope not in SCOPES:
      raise CqjaxError(f"--config.export_scope: {cfg.export_scope!r}; choose from {list(SCOPES)}")
    _parse_bits(cfg.export_bits, "export_bits")
  return [s for s in STAGES if s in stages]


def _measured(report, key, eval_sets) -> bool:
  return all(key in report["perplexity"].get(name, {}) for name, _ in eval_sets)


def _perplexities(cfg, model, params, eval_sets, key, report):
  from cqjax.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  for name, windows in eval_sets:
    res = perplexity(model, params, windows, cfg.eval_batch_size, desc=f"{key} ppl {name}")
    report["perplexity"].setdefault(name, {})[key] = res["perplexity"]
    report["tokens"][name] = res["tokens"]
    print(f"{name}: {key} perplexity {res['perplexity']:.3f} over {res['windows']} x {cfg.seqlen} tokens")
  # Every finished setting is on disk at once: a long table killed midway keeps what it measured.
  write_report(cfg, report)


def _aos_config(cfg, act=None):
  from cqjax.learn_rotation import AosConfig  # pylint: disable=g-import-not-at-top
  extra = {} if act is None else {"act": act}
  return AosConfig(lr=cfg.aos_lr, epochs=cfg.aos_epochs, batch_size=cfg.aos_batch_size, seed=cfg.seed, **extra)


def _accf_config(cfg):
  from cqjax.finetune_centroids import AccfConfig  # pylint: disable=g-import-not-at-top
  return AccfConfig(lr=cfg.accf_lr, optimizer=cfg.accf_optimizer, epochs=cfg.accf_epochs,
                    batch_size=cfg.accf_batch_size, reassign=cfg.accf_reassign, seed=cfg.seed)


def _calibration(cfg, tokenizer, ctx: dict):
  """The calibration windows, read and tokenized once per run."""
  from cqjax.text_data import calibration_windows  # pylint: disable=g-import-not-at-top
  if "calib" not in ctx:
    ctx["calib"] = calibration_windows(cfg.calib_text, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
  return ctx["calib"]


def _sample(cfg, model, params, tokenizer, model_cfg, kind: str, report) -> None:
  """A greedy continuation of `sample_prompt`, recorded as report["sample"][kind]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.generate import generate  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import tokenize  # pylint: disable=g-import-not-at-top
  prompt = tokenize(tokenizer, cfg.sample_prompt)
  if len(prompt) == 0:
    raise CqjaxError("--config.sample_prompt: tokenizes to no tokens")
  new = generate(model, params, jnp.asarray(prompt[None]), cfg.sample_tokens, eos_token_id=model_cfg.eos_token_id)
  sample = tokenizer.decode(np.asarray(new[0]).tolist())
  report.setdefault("sample", {"prompt": cfg.sample_prompt})[kind] = sample
  print(f"sample ({kind}): {cfg.sample_prompt!r} -> {sample!r}")


def _rotation_context(cfg, model_cfg, params, tokenizer, dtype, report, ctx: dict) -> dict:
  """Calibration windows, folded params, their norm outputs and the learned R1, computed once
  for every stage that needs them."""
  if "learned" in ctx:
    return ctx
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.act_quant import ActQuantConfig  # pylint: disable=g-import-not-at-top
  from cqjax.calibrate import collect_norm_outputs  # pylint: disable=g-import-not-at-top
  from cqjax.checkpoint import load_tree, save_tree  # pylint: disable=g-import-not-at-top
  from cqjax.fold_norms import fold_norms  # pylint: disable=g-import-not-at-top
  from cqjax.learn_rotation import learn_rotation  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top

  act = ActQuantConfig(bits=cfg.act_bits)
  calib = _calibration(cfg, tokenizer, ctx)
  folded_cfg, folded = fold_norms(model_cfg, params)
  norm_outputs = collect_norm_outputs(MoeCausalLM(folded_cfg, dtype), folded, calib, cfg.calib_batch_size)
  aos = _aos_config(cfg, act)
  state = os.path.join(cfg.output_dir, "state", "rotation")
  if os.path.exists(state):  # resumed: AOS is not bit-reproducible on GPUs, so R1 is reused
    tree, meta = load_tree(state)
    learned, history = tree["r1"], meta["history"]
  else:
    t0 = time.perf_counter()
    learned, history = learn_rotation(norm_outputs, aos)
    report["timings"]["aos_s"] = time.perf_counter() - t0
    save_tree(state, {"r1": learned}, {"history": [float(h) for h in history]})
  np.save(os.path.join(cfg.output_dir, "r1.npy"), learned)
  ctx.update(calib=calib, act=act, folded_cfg=folded_cfg, folded=folded, norm_outputs=norm_outputs, aos=aos,
             learned=learned, history=history)
  return ctx


def _rotation_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx):
  """Calibrate, fold norms, learn R1; W16A4 perplexity and activation statistics per variant."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.learn_rotation import initial_rotation, quantization_error  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.rotate import rotate_params  # pylint: disable=g-import-not-at-top
  from experiments.plots import plot_rotation_outliers  # pylint: disable=g-import-not-at-top

  ctx = _rotation_context(cfg, model_cfg, params, tokenizer, dtype, report, ctx)
  act, folded_cfg, folded, norm_outputs = ctx["act"], ctx["folded_cfg"], ctx["folded"], ctx["norm_outputs"]
  aos, learned, history = ctx["aos"], ctx["learned"], ctx["history"]
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
    if not _measured(report, key, eval_sets):  # a resumed run keeps what it measured
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


def _parse_bits(setting: str, option: str = "quant_bits") -> tuple[int, int]:
  import re  # pylint: disable=g-import-not-at-top
  m = re.fullmatch(r"w(\d+)a(\d+)", setting)
  if not m or not 2 <= int(m.group(1)) <= 8 or not 2 <= int(m.group(2)) <= 16:
    raise CqjaxError(f"--config.{option}: {setting!r} is not like w4a4 (weights 2-8, activations 2-16 bits)")
  return int(m.group(1)), int(m.group(2))


def _quant_settings(cfg):
  """(scopes, methods, bit-setting names, (w_bits, a_bits) pairs) of the quantize stage, checked."""
  from cqjax.quantize_weights import SCOPES  # pylint: disable=g-import-not-at-top
  split = lambda v: [x.strip() for x in v.split(",") if x.strip()]
  scopes, methods, settings = split(cfg.quant_scopes), split(cfg.quant_methods), split(cfg.quant_bits)
  if [s for s in scopes if s not in SCOPES] or not scopes:
    raise CqjaxError(f"--config.quant_scopes: {cfg.quant_scopes!r}; choose from {list(SCOPES)}")
  if [m for m in methods if m not in METHODS] or not methods:
    raise CqjaxError(f"--config.quant_methods: {cfg.quant_methods!r}; choose from {list(METHODS)}")
  if cfg.quant_group_size < 2:
    raise CqjaxError(f"--config.quant_group_size: must be at least 2, got {cfg.quant_group_size}")
  return scopes, methods, settings, [_parse_bits(b) for b in settings]


def _quantize_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx):
  """Every (scope, method, bits) of the config: quantize the scope's kernels, then perplexity."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  from cqjax.finetune_centroids import finetune_centroids  # pylint: disable=g-import-not-at-top
  from cqjax.kmeans import column_group, kmeans_quantize, rtn_quantize  # pylint: disable=g-import-not-at-top
  from cqjax.learn_rotation import initial_rotation  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.pog import apply_pog  # pylint: disable=g-import-not-at-top
  from cqjax.quantize import rotate_for_scope  # pylint: disable=g-import-not-at-top
  from cqjax.quantize_weights import quantize_scope, scope_paths  # pylint: disable=g-import-not-at-top

  scopes, methods, settings, bits = _quant_settings(cfg)
  ctx = _rotation_context(cfg, model_cfg, params, tokenizer, dtype, report, ctx)
  folded_cfg, folded = ctx["folded_cfg"], ctx["folded"]
  rotation_of = {"rtn": None, "rtn_g128": None, "hadamard_rtn": "hadamard",
                 "learned_rotation_rtn": "learned", "kmeans": "learned", "codequant": "learned",
                 "kmeans_group": "learned", "kmeans_pog": "learned", "codequant_pog": "learned"}
  r1_of = {"hadamard": initial_rotation(model_cfg.hidden_size, cfg.seed), "learned": ctx["learned"]}

  def quantizer(method, w_bits):
    if method in ("kmeans", "codequant"):
      return lambda w, path: kmeans_quantize(w, w_bits, seed=cfg.seed)
    # Column groups where they divide the input size, else the whole row (recorded in the report).
    if method in ("kmeans_group", "kmeans_pog", "codequant_pog"):
      return lambda w, path: kmeans_quantize(w, w_bits, column_group(w.shape[-2], cfg.quant_group_size),
                                             seed=cfg.seed)
    group = 128 if method == "rtn_g128" else -1
    return lambda w, path: rtn_quantize(w, w_bits, column_group(w.shape[-2], group))

  report["quantization"] = {"scopes": scopes, "methods": methods, "bits": settings,
                            "rotation_of_method": rotation_of,
                            "rtn_g128_note": "group 128 where it divides d_in, else the whole row",
                            "column_group_size": cfg.quant_group_size,  # where it divides d_in
                            "pog_note": "POG permutes o_proj inputs (and down inputs unless the online "
                                        "Hadamard R4 mixes them) before K-means"}
  for scope in scopes:
    bases = {}
    for method in methods:
      rot, pog = rotation_of[method], method.endswith("_pog")
      if rot not in bases:
        bases[rot] = rotate_for_scope(folded_cfg, folded, r1_of.get(rot), scope)
      base, full_rot = bases[rot]
      if pog:
        if (rot, "pog") not in bases:
          bases[(rot, "pog")] = apply_pog(folded_cfg, base, cfg.quant_group_size, permute_down=not full_rot), full_rot
        base = bases[(rot, "pog")][0]
      quantized = {}
      for w_bits, a_bits in bits:
        key = f"{scope}/{method}_w{w_bits}a{a_bits}"
        if _measured(report, key, eval_sets):  # resumed run
          continue
        if w_bits not in quantized:
          t0 = time.perf_counter()
          bar = tqdm(total=len(scope_paths(folded_cfg, scope)), desc=f"{scope}/{method} w{w_bits}", leave=False)
          quantized[w_bits] = quantize_scope(folded_cfg, base, scope, quantizer(method, w_bits), bar)
          bar.close()
          report["timings"][f"quantize/{scope}/{method}_w{w_bits}_s"] = time.perf_counter() - t0
        act = None if a_bits >= 16 else dataclasses.replace(ctx["act"], bits=a_bits, scope=scope)
        weights = quantized[w_bits]
        if method.startswith("codequant"):
          t0 = time.perf_counter()
          weights, history = finetune_centroids(folded_cfg, base, weights, ctx["calib"][: cfg.accf_samples],
                                                act, full_rot, _accf_config(cfg), dtype)
          report["timings"][f"accf/{key}_s"] = time.perf_counter() - t0
          report.setdefault("accf", {})[key] = history
        model = MoeCausalLM(folded_cfg, dtype, act_quant=act, online_down_hadamard=full_rot)
        _perplexities(cfg, model, weights, eval_sets, key, report)


def _export_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx):
  """CodeQuant at the export setting through the library call (resumable per step), exported,
  then reloaded from disk for its perplexity and a greedy sample."""
  import cqjax  # pylint: disable=g-import-not-at-top

  w_bits, a_bits = _parse_bits(cfg.export_bits, "export_bits")
  group = cfg.export_group_size
  qcfg = cqjax.QuantizeConfig(
      bits=w_bits, act_bits=a_bits, scope=cfg.export_scope, rotation="learned", group_size=group, pog=group > 0,
      aos=_aos_config(cfg), accf=_accf_config(cfg), accf_samples=cfg.accf_samples,
      calib_batch_size=cfg.calib_batch_size, seed=cfg.seed)
  t0 = time.perf_counter()
  qm = cqjax.quantize(params, model_cfg, _calibration(cfg, tokenizer, ctx), qcfg, dtype,
                      checkpoint_dir=os.path.join(cfg.output_dir, "state", "export"))
  report["timings"]["export/quantize_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  path = cqjax.export_quantized(os.path.join(cfg.output_dir, "export"), qm, cfg.model_path,
                                settings=cfg.to_dict(), overwrite=True)
  report["timings"]["export/write_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  loaded = cqjax.load_quantized(path)
  report["timings"]["export/reload_s"] = time.perf_counter() - t0
  report["export"] = {"path": path, "scope": cfg.export_scope, "bits": cfg.export_bits, "group_size": group,
                      "history": qm.history}
  _export_plots(cfg, qm)
  model = loaded.module(dtype)
  _perplexities(cfg, model, loaded.params, eval_sets, f"export/{cfg.export_scope}/{cfg.export_bits}", report)
  if cfg.sample_tokens > 0:
    _sample(cfg, model, loaded.params, tokenizer, model_cfg, "quantized", report)
  print(f"export: {path}")


def _export_plots(cfg, qm) -> None:
  """ACCF loss curves and the centroid histograms of a few quantized kernels of the first and last layer."""
  from cqjax.codebook import CodebookWeight  # pylint: disable=g-import-not-at-top
  from cqjax.param_paths import attn_input_readers, attn_path, ffn_path, get_path  # pylint: disable=g-import-not-at-top
  from experiments.plots import plot_accf_losses, plot_centroid_histograms  # pylint: disable=g-import-not-at-top

  if qm.history.get("accf"):
    plot_accf_losses(qm.history["accf"], os.path.join(cfg.output_dir, "accf_losses.png"))
  c = qm.config
  last = c.num_layers - 1
  moe = next((i for i in range(c.num_layers) if c.is_moe_layer(i)), 0)  # DeepSeek's first layers are dense
  candidates = [(0, attn_input_readers(c, 0)[0]), (0, attn_path(0, "o_proj")), (moe, ffn_path(c, moe, "gate_proj")),
                (last, ffn_path(c, last, "down_proj"))]
  picks = {f"layer {layer} {path[-2] if path[-1] == 'kernel' else path[-1]}": w.centroids
           for layer, path in candidates if isinstance(w := get_path(qm.params, path), CodebookWeight)}
  if picks:
    plot_centroid_histograms(picks, os.path.join(cfg.output_dir, "centroid_histograms.png"))


def _resume_state(cfg) -> tuple[bool, dict | None]:
  """(whether output_dir holds this run to resume, its report so far); refuses changed settings
  before anything is loaded."""
  from cqjax.checkpoint import read_json  # pylint: disable=g-import-not-at-top

  settings_path = os.path.join(cfg.output_dir, "run_config.json")
  if not (cfg.resume and os.path.exists(settings_path)):
    return False, None
  kept = lambda d: {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}
  previous = read_json(settings_path, "not a run's settings")
  diffs = settings_differences(kept(previous), kept(json.loads(json.dumps(cfg.to_dict()))), "was")
  if diffs:
    raise CqjaxError(f"{cfg.output_dir}: holds a run with other settings ({'; '.join(diffs[:4])}); "
                     "use another --config.output_dir, or --config.resume=False to start over")
  report_path = os.path.join(cfg.output_dir, "report.json")
  return True, read_json(report_path, "") if os.path.exists(report_path) else None


def _record_settings(cfg, resuming: bool) -> None:
  """Once the inputs are checked: the settings a later run must match; a fresh run drops old state."""
  import shutil  # pylint: disable=g-import-not-at-top

  if not resuming:
    shutil.rmtree(os.path.join(cfg.output_dir, "state"), ignore_errors=True)
  write_text_atomic(os.path.join(cfg.output_dir, "run_config.json"), json.dumps(cfg.to_dict(), indent=2))


def run(cfg) -> dict:
  """Runs the selected stages and returns the report (also written to output_dir)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cqjax.load import load_params, load_tokenizer  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import eval_windows, read_text, tokenize  # pylint: disable=g-import-not-at-top

  stages = _validate(cfg)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.dtype]
  os.makedirs(cfg.output_dir, exist_ok=True)
  resuming, resumed = _resume_state(cfg)

  timings = {}
  t0 = time.perf_counter()
  model_cfg, params = load_params(cfg.model_path, dtype, on_host=cfg.layer_streaming)
  tokenizer = load_tokenizer(cfg.model_path)
  model = MoeCausalLM(model_cfg, dtype)
  timings["load_s"] = time.perf_counter() - t0

  eval_sets = []
  for source in [t.strip() for t in cfg.eval_texts.split(",") if t.strip()]:
    name, text = read_text(source)
    windows = eval_windows(tokenize(tokenizer, text), cfg.seqlen, name)
    eval_sets.append((name, windows[: cfg.max_eval_windows] if cfg.max_eval_windows else windows))
  _record_settings(cfg, resuming)

  report = {"model_path": os.path.abspath(cfg.model_path), "model_type": model_cfg.model_type,
            "dtype": cfg.dtype, "seqlen": cfg.seqlen, "stages": stages, "tokens": {},
            "perplexity": {}, "timings": timings, "settings": cfg.to_dict()}
  if resumed is not None:  # measured results carry over; this attempt's timings start afresh
    previous = resumed.get("previous_attempts", []) + [{"stages": resumed["stages"], "timings": resumed["timings"]}]
    report = {**resumed, "stages": stages, "settings": cfg.to_dict(), "timings": timings,
              "previous_attempts": previous}
  if resuming:
    print(f"resuming the run in {cfg.output_dir}")
  if "eval" in stages:
    t0 = time.perf_counter()
    if not _measured(report, "fp", eval_sets):
      _perplexities(cfg, model, params, eval_sets, "fp", report)
      timings["eval_s"] = time.perf_counter() - t0
    if cfg.sample_tokens > 0:
      _sample(cfg, model, params, tokenizer, model_cfg, "fp", report)
  ctx = {}
  if "rotate" in stages:
    t0 = time.perf_counter()
    _rotation_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx)
    timings["rotate_s"] = time.perf_counter() - t0
  if "quantize" in stages:
    t0 = time.perf_counter()
    _quantize_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx)
    timings["quantize_s"] = time.perf_counter() - t0
  if "export" in stages:
    t0 = time.perf_counter()
    _export_stage(cfg, model_cfg, params, tokenizer, dtype, eval_sets, report, ctx)
    timings["export_s"] = time.perf_counter() - t0

  write_report(cfg, report)
  print(f"report: {os.path.join(cfg.output_dir, 'report.json')}")
  return report


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every array read and write at INFO
  if _CONFIG.value is None:
    sys.exit("error: --config is required (e.g. --config=tiny.py)")
  try:
    run(_CONFIG.value)
  except CqjaxError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, argv=resolve_config_arg(sys.argv))
