"""Settings every main-job config shares; each config file overrides what differs."""
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The texts (wikitext-2/, imdb/); CQJAX_DATA points elsewhere, e.g. on a machine without ../shared.
SHARED_DATA = os.environ.get("CQJAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_path = ""  # a Hugging Face checkpoint directory (config.json + *.safetensors)
  c.dtype = "bfloat16"  # float32 | bfloat16 | float16
  # Comma-separated text files evaluated with the perplexity harness.
  c.eval_texts = ",".join([os.path.join(SHARED_DATA, "wikitext-2", "wiki.test.tokens")])
  c.seqlen = 2048
  c.eval_batch_size = 4
  c.max_eval_windows = 0  # 0 = every window of every text
  c.output_dir = "runs/default"
  c.stages = "eval"  # comma-separated subset of experiments.run.STAGES
  # Calibration (the official protocol: 512 random windows of 256 tokens).
  c.calib_text = os.path.join(SHARED_DATA, "wikitext-2", "wiki.valid.tokens")
  c.calib_samples = 512
  c.calib_seqlen = 256
  c.calib_batch_size = 16
  # Rotation stage (AOS): activation bits and the optimiser of R1.
  c.act_bits = 4
  c.aos_lr = 1e-4
  c.aos_epochs = 4
  c.aos_batch_size = 16
  # Quantize stage: every scope x method x bits setting.
  c.quant_scopes = "official,full"
  c.quant_methods = "rtn,rtn_g128,hadamard_rtn,learned_rotation_rtn,kmeans,codequant"
  c.quant_bits = "w4a16,w4a4,w3a4"
  # Column-group size of kmeans_group / kmeans_pog / codequant_pog (POG needs it to divide head_dim).
  c.quant_group_size = 64
  # ACCF centroid fine-tuning (codequant). The reference uses SGD lr 1e-4; on our checkpoints
  # that leaves the centroids unchanged (BENCHMARKS.md), so Adam is the default.
  c.accf_optimizer = "adam"
  c.accf_lr = 1e-3
  c.accf_reassign = True
  c.accf_epochs = 4
  c.accf_batch_size = 32
  c.accf_samples = 512
  # Export stage: the model to serve (CodeQuant; column groups + POG when export_group_size > 0).
  c.export_scope = "full"
  c.export_bits = "w4a4"
  c.export_group_size = -1
  # Keep the weights in host memory and quantize one layer at a time on the device (for a model
  # larger than the device, e.g. Mixtral-8x7B on one 80 GB GPU); only the export stage runs so.
  c.layer_streaming = False
  # Re-running with the same output_dir continues a killed run; False starts over.
  c.resume = True
  c.sample_prompt = "The"
  c.sample_tokens = 20
  c.seed = 0
  return c


def checkpoint_config(output_dir: str) -> ml_collections.ConfigDict:
  """A real (multi-GB) checkpoint given by --config.model_path: bf16, the 2048-token protocol."""
  c = base_config()
  c.dtype = "bfloat16"
  c.seqlen = 2048
  c.eval_batch_size = 1
  c.output_dir = output_dir
  # The paper's comparison at W4A4 in its scope, then the model to serve (CodeQuant, scope full).
  c.stages = "eval,quantize,export"
  c.quant_scopes = "official"
  c.quant_methods = "rtn,hadamard_rtn,kmeans,codequant"
  c.quant_bits = "w4a4"
  return c
