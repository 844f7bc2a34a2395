"""POG permutations preserve the model's function and mix high- and low-variance blocks."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DEFAULT
from cqjax.errors import CqjaxError
from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.pog import apply_pog, pog_permutation


def test_permutation_puts_one_high_spread_block_in_each_group():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 6)) * np.repeat([5.0, 1.0, 1.0, 1.0], 8)[:, None]  # one wide block of 8
  perm = pog_permutation(w, group_size=16, blocks_per_group=2)
  assert sorted(perm) == list(range(32))
  spreads = [w[perm[s:s + 8]].std(0).mean() for s in range(0, 32, 8)]
  # Each group of 16 starts with a block of higher spread than the block that follows it.
  assert spreads[0] > spreads[1] and spreads[2] > spreads[3]
  with pytest.raises(CqjaxError, match="POG: group_size 12"):
    pog_permutation(w, group_size=12)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "reference"])
def test_pog_preserves_logits(hf_checkpoints, name):
  path = TINY_DEFAULT if name == "reference" else hf_checkpoints[name]
  cfg, params = load_params(path, jnp.float32, progress=False)
  group = 4 if cfg.head_dim % 8 else 8
  permuted = apply_pog(cfg, params, group_size=group)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13)))
  ref = MoeCausalLM(cfg).apply({"params": params}, tokens)[0]
  got = MoeCausalLM(cfg).apply({"params": permuted}, tokens)[0]
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) <= 1e-5
  assert not np.array_equal(permuted["layers_0"]["attn"]["o_proj"]["kernel"], params["layers_0"]["attn"]["o_proj"]["kernel"])
