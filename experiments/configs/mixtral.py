"""Mixtral-8x7B (or any Mixtral-family checkpoint): pass --config.model_path=DIR."""
from experiments.configs.base import checkpoint_config


def get_config():
  return checkpoint_config("runs/mixtral")
