"""The main job: python -m experiments.run --config=tiny.py [--config.key=value ...].

Bare config names resolve in experiments/configs/. Stages so far: `eval` (load the checkpoint,
full-precision perplexity on every text in `eval_texts`, a short greedy sample). Writes
`<output_dir>/report.json`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from ml_collections import config_flags

from cqjax.errors import CqjaxError

STAGES = ("eval",)
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


def run(cfg) -> dict:
  """Runs the selected stages and returns the report (also written to output_dir)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from cqjax.generate import generate  # pylint: disable=g-import-not-at-top
  from cqjax.load import load_params, load_tokenizer  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.perplexity import perplexity  # pylint: disable=g-import-not-at-top
  from cqjax.text_data import eval_windows, read_text, tokenize  # pylint: disable=g-import-not-at-top

  stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise CqjaxError(f"--config.stages: unknown stage(s) {unknown}; choose from {list(STAGES)}")
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if cfg.dtype not in dtypes:
    raise CqjaxError(f"--config.dtype: {cfg.dtype!r} is not one of {list(dtypes)}")
  if cfg.seqlen < 2:
    raise CqjaxError(f"--config.seqlen: must be at least 2, got {cfg.seqlen}")
  if not cfg.model_path:
    raise CqjaxError("--config.model_path: no checkpoint directory given")
  os.makedirs(cfg.output_dir, exist_ok=True)
  texts = [t.strip() for t in cfg.eval_texts.split(",") if t.strip()]

  timings = {}
  t0 = time.perf_counter()
  model_cfg, params = load_params(cfg.model_path, dtypes[cfg.dtype])
  tokenizer = load_tokenizer(cfg.model_path)
  model = MoeCausalLM(model_cfg, dtypes[cfg.dtype])
  timings["load_s"] = time.perf_counter() - t0

  report = {"model_path": os.path.abspath(cfg.model_path), "model_type": model_cfg.model_type,
            "dtype": cfg.dtype, "seqlen": cfg.seqlen, "tokens": {}, "perplexity": {},
            "settings": cfg.to_dict()}
  t0 = time.perf_counter()
  for source in texts:
    name, text = read_text(source)
    ids = tokenize(tokenizer, text)
    windows = eval_windows(ids, cfg.seqlen, name)
    if cfg.max_eval_windows:
      windows = windows[: cfg.max_eval_windows]
    res = perplexity(model, params, windows, cfg.eval_batch_size, desc=f"fp ppl {name}")
    report["tokens"][name] = res["tokens"]
    report["perplexity"][name] = {"fp": res["perplexity"]}
    print(f"{name}: fp perplexity {res['perplexity']:.3f} over {res['windows']} x {cfg.seqlen} tokens")
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

  report["timings"] = timings
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
