"""Folding norms and fusing rotations leave the full-precision model's logits unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DEFAULT
from cqjax.errors import CqjaxError
from cqjax.fold_norms import fold_norms
from cqjax.hadamard import hadamard_matrix, hadamard_transform, random_hadamard, random_orthogonal
from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.param_paths import attn_input_readers, attn_path, get_path
from cqjax.rotate import rotate_params


def _logits(cfg, params, tokens, **kw):
  return np.asarray(MoeCausalLM(cfg, jnp.float32, **kw).apply({"params": params}, tokens)[0])


def _rel(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


def _randomize_norms(params, seed):
  """Checkpoints saved by transformers have unit norm scales: make them non-trivial."""
  key = iter(jax.random.split(jax.random.key(seed), 1000))
  def f(path, x):
    name = jax.tree_util.keystr(path)
    return x * jax.random.uniform(next(key), x.shape, minval=0.5, maxval=2.0) if "norm" in name else x
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.fixture(params=["mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v2_greedy", "reference"])
def model_and_tokens(request, hf_checkpoints):
  path = TINY_DEFAULT if request.param == "reference" else hf_checkpoints[request.param]
  cfg, params = load_params(path, jnp.float32, progress=False)
  params = _randomize_norms(params, 0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 21)))
  return cfg, params, tokens


def test_fold_norms_keeps_logits(model_and_tokens):
  cfg, params, tokens = model_and_tokens
  cfg2, folded = fold_norms(cfg, params)
  assert _rel(_logits(cfg2, folded, tokens), _logits(cfg, params, tokens)) <= 1e-5
  assert all(bool(jnp.all(folded[f"layers_{i}"]["input_norm"]["scale"] == 1)) for i in range(cfg.num_layers))


def test_fold_norms_unties_tied_embeddings(model_and_tokens):
  import dataclasses
  cfg, params, tokens = model_and_tokens
  tied_cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
  tied = {k: v for k, v in params.items() if k != "lm_head"}
  cfg2, folded = fold_norms(tied_cfg, tied)
  assert not cfg2.tie_word_embeddings and "lm_head" in folded
  assert _rel(_logits(cfg2, folded, tokens), _logits(tied_cfg, tied, tokens)) <= 1e-5


def test_rotations_keep_logits(model_and_tokens):
  cfg, params, tokens = model_and_tokens
  ref = _logits(cfg, params, tokens)
  cfg2, folded = fold_norms(cfg, params)
  d = cfg.hidden_size
  r1 = random_hadamard(d, 1) if d & (d - 1) == 0 else random_orthogonal(d, 1)
  r2 = hadamard_matrix(cfg.value_head_dim)
  rotated = rotate_params(cfg2, folded, r1, r2, online_down_hadamard=True)
  got = _logits(cfg2, rotated, tokens, online_down_hadamard=True)
  assert _rel(got, ref) <= 1e-4
  # The rotation really changed the weights the quantizer will see (the stream's first reader,
  # o_proj through R2, and with latent attention kv_b_proj's value columns).
  changed = [attn_input_readers(cfg, 0)[0], attn_path(0, "o_proj")] + ([attn_path(0, "kv_b_proj")] if cfg.mla else [])
  for path in changed:
    assert _rel(np.asarray(get_path(rotated, path)), np.asarray(get_path(folded, path))) > 0.1, path


def test_rotating_unfolded_params_is_refused(hf_checkpoints):
  cfg, params = load_params(hf_checkpoints["mixtral"], jnp.float32, progress=False)
  params = _randomize_norms(params, 1)
  with pytest.raises(CqjaxError, match="fold_norms"):
    rotate_params(cfg, params, np.eye(cfg.hidden_size))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 48, 192, 256, 768, 5120, 14336])
def test_hadamard_matrices_are_orthonormal(n):
  h = hadamard_matrix(n)
  # Every row against every row up to 5120; for 14336, 256 random rows against all (the full
  # product is 3 TFLOP in float64: a minute of the suite).
  rows = np.sort(np.random.default_rng(n).choice(n, min(n, 256), replace=False)) if n > 5120 else np.arange(n)
  want = np.zeros((len(rows), n))
  want[np.arange(len(rows)), rows] = 1.0
  np.testing.assert_allclose(h[rows] @ h.T, want, atol=1e-12)
  # Every entry exactly ±1/sqrt(n), 1024 rows at a time: no n x n temporaries (1.6 GB each at 14336).
  assert all(np.all(np.abs(h[i:i + 1024]) == 1 / np.sqrt(n)) for i in range(0, n, 1024))


@pytest.mark.parametrize("n", [1, 12, 48, 192, 256, 768, 5120])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hadamard_transform_is_the_dense_product(n, dtype):
  x = jnp.asarray(np.random.default_rng(n).normal(size=(2, 3, n)), dtype)
  want = np.asarray(x, np.float64) @ hadamard_matrix(n)
  got = hadamard_transform(x)
  assert got.dtype == dtype and got.shape == x.shape
  tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one rounding of the output
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * np.abs(want).max())


def test_hadamard_refuses_impossible_sizes():
  with pytest.raises(CqjaxError, match="no Hadamard construction for size 28"):
    hadamard_matrix(28)
