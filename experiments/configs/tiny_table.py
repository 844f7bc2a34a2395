"""The clustering issue's accuracy table on the embedded tiny checkpoint: both scopes, every
method, W4A16 / W4A4 / W3A4, the full calibration protocol and every evaluation window."""
from experiments.configs import tiny


def get_config():
  c = tiny.get_config()
  c.stages = "eval,quantize"
  c.max_eval_windows = 0
  c.eval_batch_size = 32
  c.calib_samples = 512
  c.accf_samples = 512
  c.quant_methods = ("rtn,rtn_g128,hadamard_rtn,learned_rotation_rtn,kmeans,codequant,"
                     "kmeans_group,kmeans_pog,codequant_pog")
  c.quant_bits = "w4a16,w4a4,w3a4"
  c.sample_tokens = 0
  c.output_dir = "runs/tiny_table"
  return c
