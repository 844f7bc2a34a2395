"""POG permutations preserve the model's function and mix high- and low-variance blocks."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DEFAULT
from cqjax.errors import CqjaxError
from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.fold_norms import fold_norms
from cqjax.hadamard import hadamard_matrix, random_orthogonal
from cqjax.pog import apply_pog, pog_permutation
from cqjax.rotate import rotate_params


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


def test_pog_after_full_rotation_preserves_logits():
  """The full scope's combination: R1, R2 per head and the online Hadamard R4, then POG on the
  o_proj inputs only (R4 mixes the down projection's inputs at run time)."""
  cfg, params = fold_norms(*load_params(TINY_DEFAULT, jnp.float32, progress=False))
  rotated = rotate_params(cfg, params, random_orthogonal(cfg.hidden_size, 0), hadamard_matrix(cfg.head_dim),
                          online_down_hadamard=True)
  permuted = apply_pog(cfg, rotated, group_size=16, permute_down=False)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11)))
  model = MoeCausalLM(cfg, online_down_hadamard=True)
  ref = model.apply({"params": rotated}, tokens)[0]
  got = model.apply({"params": permuted}, tokens)[0]
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) <= 1e-5
  moe, moe_rot = permuted["layers_1"]["moe"], rotated["layers_1"]["moe"]
  assert np.array_equal(moe["down_proj"], moe_rot["down_proj"]) and np.array_equal(moe["up_proj"], moe_rot["up_proj"])
