"""AOS: learn the residual-stream rotation R1 = H · Cayley(A) that makes every norm output easy
to quantize to 4 bits per token.

Loss: Σ over norm outputs X (each layer's attention and MoE input) of mean ‖X R1 − Q_a(X R1)‖²,
on the full-precision model's activations (collected once: the loss needs no forward of the
rotated model). A is skew-symmetric (parameterised as A = B − Bᵀ), zero at the start, so R1
starts at the randomised Hadamard H and stays orthogonal. optax Adam, one jitted step.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.errors import CqjaxError
from cqjax.hadamard import random_hadamard, random_orthogonal


@dataclasses.dataclass(frozen=True)
class AosConfig:
  """Defaults are the official implementation's: Adam lr 1e-4, batch 16, 4 epochs."""

  lr: float = 1e-4
  epochs: int = 4
  batch_size: int = 16
  seed: int = 0
  act: ActQuantConfig = ActQuantConfig()


def initial_rotation(d: int, seed: int) -> np.ndarray:
  """Randomised Hadamard of size d, or a random orthogonal matrix where none can be built."""
  try:
    return random_hadamard(d, seed)
  except CqjaxError:
    return random_orthogonal(d, seed)


def cayley(b: jax.Array) -> jax.Array:
  """Orthogonal (I + A)^-1 (I − A) with A = B − Bᵀ skew-symmetric; identity at B = 0."""
  a = b - b.T
  eye = jnp.eye(a.shape[0], dtype=a.dtype)
  return jnp.linalg.solve(eye + a, eye - a)


def quantization_error(x: jax.Array, r: jax.Array, act: ActQuantConfig) -> jax.Array:
  """x [sources, ..., d] -> mean ‖x r − Q_a(x r)‖² per source [sources]."""
  y = jnp.einsum("s...d,de->s...e", x.astype(jnp.float32), r)
  err = y - fake_quant(y, dataclasses.replace(act, ste=False))
  return jnp.mean(err.reshape(err.shape[0], -1) ** 2, axis=-1)


def aos_step(h: jax.Array, opt: optax.GradientTransformation, act: ActQuantConfig):
  """The AOS update for rotations h · cayley(b): (b [d, d], opt_state, x [sources, batch, t, d]) ->
  (b, opt_state, summed loss). Pure, to be jitted."""
  def step(b, state, x):
    loss, grad = jax.value_and_grad(lambda b: jnp.sum(quantization_error(x, h @ cayley(b), act)))(b)
    updates, state = opt.update(grad, state, b)
    return optax.apply_updates(b, updates), state, loss
  return step


def learn_rotation(norm_outputs: np.ndarray, cfg: AosConfig = AosConfig(), progress: bool = True
                   ) -> tuple[np.ndarray, list[float]]:
  """norm_outputs [sources, n, t, d] (from `collect_norm_outputs`) -> (R1 [d, d] float64,
  mean loss per epoch). R1 is evaluated in float64 at the end, so it is orthogonal to ~1e-12."""
  s, n, t, d = norm_outputs.shape
  if n < cfg.batch_size:
    raise CqjaxError(f"AOS needs at least batch_size={cfg.batch_size} calibration samples, got {n}")
  h = initial_rotation(d, cfg.seed)
  opt = optax.adam(cfg.lr)
  b = jnp.zeros((d, d), jnp.float32)
  state = opt.init(b)
  step = jax.jit(aos_step(jnp.asarray(h, jnp.float32), opt, cfg.act))

  rng = np.random.default_rng(cfg.seed)
  history = []
  steps_per_epoch = n // cfg.batch_size
  bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="AOS rotation", disable=not progress, leave=False)
  for _ in range(cfg.epochs):
    order = rng.permutation(n)
    losses = []
    for k in range(steps_per_epoch):
      idx = np.sort(order[k * cfg.batch_size: (k + 1) * cfg.batch_size])
      b, state, loss = step(b, state, jnp.asarray(norm_outputs[:, idx]))
      losses.append(float(loss))
      bar.update()
      bar.set_postfix(loss=f"{losses[-1]:.4g}")
    history.append(float(np.mean(losses)))
  bar.close()
  a = np.asarray(b, np.float64)
  a = a - a.T
  eye = np.eye(d)
  return h @ np.linalg.solve(eye + a, eye - a), history
