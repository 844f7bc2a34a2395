"""Orthonormal Hadamard matrices of the sizes real models have.

Sylvester gives 2^a; Paley's first construction gives q + 1 for a prime q ≡ 3 (mod 4)
(12, 20, 24, 44, 48, ..., 224); Kronecker products combine them, as QuaRot does with its stored
12/20/28/... matrices: Mixtral's 14336 = 224 · 64, DeepSeek-V2's 5120 = 20 · 256, a 192-wide
expert = 12 · 16. Sizes with no such factorisation raise; callers may fall back to a random
orthogonal matrix. `hadamard_transform` applies the matrix online (R4 before every down
projection) factor by factor, never building it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.errors import CqjaxError


def _is_prime(q: int) -> bool:
  return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _paley(q: int) -> np.ndarray:
  """±1 Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
  residues = {(i * i) % q for i in range(1, q)}
  chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)])
  jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # skew-symmetric for q ≡ 3 (4)
  s = np.zeros((q + 1, q + 1))
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = jac
  return s + np.eye(q + 1)


_MAX_FACTOR = 128  # Sylvester factors are split to at most this size (2^7)


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[np.ndarray, ...]:
  """±1 Hadamard matrices whose Kronecker product, over sqrt(n), is `hadamard_matrix(n)`: the
  Paley core (if n is not a power of two), then Sylvester factors of at most 128."""
  if n < 1:
    raise CqjaxError(f"no Hadamard matrix of size {n}")
  two = n & -n  # largest power of two dividing n
  m = n // two
  factors = []
  if m > 1:
    # m·2^j = q + 1 for a prime q ≡ 3 (mod 4), taking the smallest such j.
    for j in range(0, two.bit_length()):
      size = m << j
      if _is_prime(size - 1) and (size - 1) % 4 == 3:
        factors.append(_paley(size - 1))
        two >>= j
        break
    else:
      raise CqjaxError(f"no Hadamard construction for size {n} (= {m} · {two})")
  while two > 1 or not factors:
    factors.append(_sylvester(min(two, _MAX_FACTOR)))
    two //= min(two, _MAX_FACTOR)
  return tuple(factors)


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Hadamard matrix [n, n] (entries ±1/sqrt(n)), float64."""
  # The ±1 factors' Kronecker product in int8, scaled once: at 14336 a float64 product is 1.6 GB,
  # and writing it twice took most of 20 s.
  h = functools.reduce(np.kron, [f.astype(np.int8) for f in hadamard_factors(n)])
  return h * (1 / np.sqrt(n))


def hadamard_transform(x: jax.Array) -> jax.Array:
  """x [..., n] @ hadamard_matrix(n), one small matmul per Kronecker factor (for Mixtral's
  14336 = 224 · 64: 288 multiply-adds an element instead of 14336, and no 14336² constant),
  in float32, returned in x's dtype."""
  n = x.shape[-1]
  factors = hadamard_factors(n)
  y = x.astype(jnp.float32).reshape(*x.shape[:-1], *(f.shape[0] for f in factors))
  for axis, f in enumerate(factors):
    # (x @ kron(A, B))[i, j] = sum_ab x[a, b] A[a, i] B[b, j]: contract each factor's own axis.
    y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(f, jnp.float32), axes=[[x.ndim - 1 + axis], [0]]), -1,
                     x.ndim - 1 + axis)
  return (y.reshape(x.shape) / np.sqrt(n)).astype(x.dtype)


def random_hadamard(n: int, seed: int) -> np.ndarray:
  """diag(random signs) · H: a random orthogonal matrix that still spreads every channel
  over all others (QuaRot's randomised Hadamard), float64."""
  signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
  return signs[:, None] * hadamard_matrix(n)


def random_orthogonal(n: int, seed: int) -> np.ndarray:
  """Haar-random orthogonal matrix (QR of a Gaussian), float64: the fallback for sizes with no
  Hadamard construction."""
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :]
