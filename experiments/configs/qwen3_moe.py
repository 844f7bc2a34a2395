"""Qwen3-30B-A3B (or any Qwen3-MoE checkpoint): pass --config.model_path=DIR."""
from experiments.configs.base import base_config


def get_config():
  c = base_config()
  c.dtype = "bfloat16"
  c.seqlen = 2048
  c.eval_batch_size = 1
  c.output_dir = "runs/qwen3_moe"
  return c
