"""The CUDA expert slots (cuda_kernels/expert_slots.*) against cqjax.codebook.expert_slots on a GPU
where the library is built."""
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax import codebook
from cuda_kernels import expert_slots as ces


@pytest.mark.skipif(not ces.available(), reason="needs a CUDA GPU and the built library (python -m cuda_kernels.build)")
@pytest.mark.parametrize("experts,empty,slots", [(1, 0.0, 1), (1, 1.0, 1), (8, 0.5, 8), (128, 0.9, 128), (128, 0.9, 3),
                                                 (300, 0.97, 300), (33, 1.0, 16), (1000, 0.5, 1000)])
def test_matches_the_xla_slots(experts, empty, slots):
  rng = np.random.default_rng(experts + slots)
  sizes = jnp.asarray(np.where(rng.random(experts) < empty, 0, rng.integers(1, 40, experts)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(ces.expert_slots(sizes, slots)), np.asarray(codebook.expert_slots(sizes, slots)))
