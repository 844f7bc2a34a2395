"""The DeepSeek-V2 accuracy table on the tiny DeepSeek-V2 reference checkpoint
(`python -m experiments.train_reference train --size=tiny_deepseek`): FP, RTN, Hadamard + RTN,
learned rotation + RTN, K-means and CodeQuant at W4A16 and W4A4, both scopes, the full
calibration protocol and every evaluation window. Give the checkpoint with --config.model_path=DIR."""
from experiments.configs import tiny_table


def get_config():
  c = tiny_table.get_config()
  c.model_path = ""
  c.quant_methods = "rtn,hadamard_rtn,learned_rotation_rtn,kmeans,codequant"
  c.quant_bits = "w4a16,w4a4"
  c.output_dir = "runs/deepseek_tiny_table"
  return c
