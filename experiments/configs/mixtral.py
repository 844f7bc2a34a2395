"""Mixtral-8x7B (or any Mixtral-family checkpoint): pass --config.model_path=DIR."""
from experiments.configs.base import base_config


def get_config():
  c = base_config()
  c.dtype = "bfloat16"
  c.seqlen = 2048
  c.eval_batch_size = 1
  c.output_dir = "runs/mixtral"
  return c
