"""The small reference checkpoint (115 M parameters; `python -m experiments.train_reference train
--size=small`, about 8 minutes on an H100) with the accuracy table's settings; give its directory
with --config.model_path=DIR. Evaluation uses the first 256 windows of 512 tokens of each text."""
from experiments.configs import tiny_table


def get_config():
  c = tiny_table.get_config()
  c.model_path = ""
  c.max_eval_windows = 256
  c.output_dir = "runs/small"
  return c
