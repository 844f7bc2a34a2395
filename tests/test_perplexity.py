"""The perplexity harness against transformers' own loss on the same windows."""
import math

import jax.numpy as jnp
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.perplexity import perplexity


def test_perplexity_matches_transformers_loss(hf_checkpoints):
  path = hf_checkpoints["mixtral"]
  cfg, params = load_params(path, jnp.float32, progress=False)
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 24)).astype(np.int32)
  # batch 2 over 5 windows exercises the padded last batch.
  ours = perplexity(MoeCausalLM(cfg), params, windows, batch_size=2, progress=False)
  hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    t = torch.tensor(windows, dtype=torch.long)
    losses = [hf(t[i:i + 1], labels=t[i:i + 1]).loss.item() for i in range(len(t))]
  assert ours["windows"] == 5 and ours["tokens"] == 5 * 24
  np.testing.assert_allclose(ours["perplexity"], math.exp(np.mean(losses)), rtol=1e-5)
