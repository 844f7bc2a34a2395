"""DeepSeek-V2-Lite (15.7 B parameters; or any DeepSeek-V2-family checkpoint): pass
--config.model_path=DIR. The paper's settings, as for Mixtral and Qwen3-MoE: 512 calibration
windows of 256 WikiText-2 tokens, W4A4, the 2048-token perplexity protocol."""
from experiments.configs.base import checkpoint_config


def get_config():
  return checkpoint_config("runs/deepseek_v2_lite")
