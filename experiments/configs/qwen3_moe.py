"""Qwen3-30B-A3B (or any Qwen3-MoE checkpoint): pass --config.model_path=DIR."""
from experiments.configs.base import checkpoint_config


def get_config():
  return checkpoint_config("runs/qwen3_moe")
