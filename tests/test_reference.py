"""The committed reference checkpoint and the script that trains such checkpoints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_DEFAULT
from cqjax.load import load_params, load_tokenizer
from cqjax.model import MoeCausalLM
from cqjax.perplexity import perplexity
from cqjax.text_data import eval_windows, read_text, tokenize
from experiments import train_reference

IMDB_EXCERPT = os.path.join(REPO, "tests", "data", "imdb_valid_excerpt.txt")
WIKI_EXCERPT = os.path.join(REPO, "tests", "data", "wikitext2_valid_excerpt.txt")


TINY_DEEPSEEK = os.path.join(REPO, "experiments", "assets", "tiny-deepseek-v2-imdb")
TINY_CHECKPOINTS = pytest.mark.parametrize("path,hf_class", [(TINY_DEFAULT, "MixtralForCausalLM"),
                                                             (TINY_DEEPSEEK, "DeepseekV2ForCausalLM")])


@TINY_CHECKPOINTS
def test_tiny_reference_matches_transformers(path, hf_class):
  cfg, params = load_params(path, jnp.float32, progress=False)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 33))
  ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  assert type(ref).__name__ == hf_class
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  got, _ = MoeCausalLM(cfg).apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= 1e-4


@TINY_CHECKPOINTS
def test_tiny_reference_is_trained(path, hf_class):
  del hf_class
  cfg, params = load_params(path, jnp.float32, progress=False)
  windows = eval_windows(tokenize(load_tokenizer(path), read_text(IMDB_EXCERPT)[1]), 256)[:6]
  model = MoeCausalLM(cfg)
  trained = perplexity(model, params, windows, 6, progress=False)["perplexity"]
  random_init = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  untrained = perplexity(model, random_init, windows, 6, progress=False)["perplexity"]
  assert untrained > 4000  # about the vocabulary size, 8192
  assert trained < untrained / 20, (trained, untrained)


def test_load_balancing_loss_is_top_k_when_uniform():
  uniform = jnp.zeros((64, 8))
  assert float(train_reference.load_balancing_loss(uniform, 2)) == pytest.approx(2.0)
  skewed = jnp.zeros((64, 8)).at[:, 0].set(5.0)
  assert float(train_reference.load_balancing_loss(skewed, 2)) > 4.0


@pytest.mark.parametrize("size,model_type", [("test", "mixtral"), ("test_deepseek", "deepseek_v2")])
def test_prepare_and_train_end_to_end(tmp_path, size, model_type):
  data = tmp_path / "data"
  train_reference.prepare(str(data), corpora={"train": IMDB_EXCERPT, "imdb_valid": IMDB_EXCERPT,
                                               "wikitext2_test": WIKI_EXCERPT})
  assert np.load(data / "train.npy").dtype == np.uint16
  out = tmp_path / "ckpt"
  metrics = train_reference.train(size, str(data), str(out), steps=4, log_every=2)
  assert [h["step"] for h in metrics["history"]] == [2, 4]
  assert set(metrics["perplexity"]) == {"imdb_valid", "wikitext2_test"}
  saved = json.load(open(out / "training_metrics.json"))
  assert saved["parameters"] == metrics["parameters"] > 0
  # What the script writes is a Hugging Face directory cqjax and transformers both load, alike.
  cfg, params = load_params(str(out), jnp.float32, progress=False)
  assert cfg.model_type == model_type and cfg.vocab_size == 8192
  assert load_tokenizer(str(out))("a film")["input_ids"]
  assert (out / "loss_curve.png").exists()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
  with torch.no_grad():
    want = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(torch.tensor(tokens)).logits.numpy()
  got, _ = MoeCausalLM(cfg).apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() <= 1e-4
