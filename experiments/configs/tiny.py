"""The embedded default: a tiny Mixtral-architecture checkpoint shipped in the repository."""
import os

from experiments.configs.base import REPO, SHARED_DATA, base_config


def get_config():
  c = base_config()
  c.model_path = os.path.join(REPO, "experiments", "assets", "tiny-mixtral-imdb")
  c.dtype = "float32"
  c.eval_texts = ",".join([os.path.join(SHARED_DATA, "wikitext-2", "wiki.test.tokens"),
                           os.path.join(SHARED_DATA, "imdb", "valid.txt")])
  c.seqlen = 512
  c.eval_batch_size = 8
  # A quick default on a laptop CPU (32 windows of 512 tokens per text and setting);
  # BENCHMARKS.md numbers use --config.max_eval_windows=0 (every window).
  c.max_eval_windows = 32
  c.stages = "eval,rotate,quantize,export"
  # Quick default (about 5 minutes on 2 CPU cores): the W4A4 column only, 128 calibration
  # windows, ACCF on 64 of them. BENCHMARKS.md's commands restore the full protocol (512 / 512).
  c.quant_bits = "w4a4"
  c.calib_samples = 128
  c.accf_samples = 64
  c.output_dir = "runs/tiny"
  return c
