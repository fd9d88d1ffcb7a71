"""Load-balanced token layouts of a sequence split over a mesh axis, and moves between them.

With the sequence split contiguously over P devices, causal attention gives device P-1 all
the work and device 0 almost none. The balanced layouts spread it:

* ``"zigzag"``: the sequence is cut into 2P chunks of T/(2P) tokens; device p holds chunks
  p and 2P-1-p (an early and a late one);
* ``"striped"``: device p holds tokens p, p+P, p+2P, ...

:func:`load_balance_permutation` is the permutation of the global sequence (for the data
pipeline, which can emit rows already in the balanced order, and for tests).
:func:`to_layout` and :func:`from_layout` move a sequence that is already split over the axis
between the natural (contiguous) layout and a balanced one from inside ``shard_map``, with
collectives: two ``ppermute`` for zigzag (every device sends T/P tokens), one ``all_to_all``
for striped (every device keeps 1/P of its tokens and sends the rest). No device ever holds
more than its T/P tokens, unlike a gather of the permuted global array.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

LOAD_BALANCES = (None, "zigzag", "striped")


def load_balance_permutation(seq_len: int, num_devices: int, load_balance) -> np.ndarray:
  """``perm`` such that ``x[:, perm]`` is the sequence in the device order of ``load_balance``
  (device p then holds ``perm[p * T/P:(p + 1) * T/P]``). The data pipeline can produce this
  order directly; ``np.argsort(perm)`` undoes it."""
  t, p = seq_len, num_devices
  if load_balance not in LOAD_BALANCES:
    raise ValueError(f"load_balance must be one of {LOAD_BALANCES}, got {load_balance!r}.")
  parts = 2 * p if load_balance == "zigzag" else p
  if t % parts:
    raise ValueError(f"load_balance={load_balance!r} on {p} devices needs a sequence length "
                     f"divisible by {parts}, got {t}.")
  if load_balance is None:
    return np.arange(t)
  if load_balance == "zigzag":
    chunks = np.arange(t).reshape(2 * p, t // (2 * p))
    order = [i for d in range(p) for i in (d, 2 * p - 1 - d)]
    return chunks[order].reshape(-1)
  return np.arange(t).reshape(t // p, p).T.reshape(-1)


def in_shard_layout_error(local_len: int, num_devices: int, load_balance) -> str | None:
  """Why :func:`to_layout` cannot move a shard of ``local_len`` tokens (None if it can)."""
  if load_balance == "zigzag" and local_len % 2:
    return (f"the zigzag layout needs an even number of tokens per device (two chunks), got "
            f"{local_len}")
  if load_balance == "striped" and local_len % num_devices:
    return (f"moving to the striped layout inside shard_map needs the tokens per device "
            f"({local_len}) to be divisible by the number of devices ({num_devices}), i.e. a "
            f"sequence length divisible by {num_devices}^2")
  return None


def _zigzag_permutations(num_devices):
  """ppermute pairs (natural device d -> zigzag device) of the even and of the odd chunks.

  Natural device d holds chunks 2d (slot 0) and 2d+1 (slot 1); chunk m belongs to zigzag
  device m (slot 0) if m < P, else to device 2P-1-m (slot 1). Each map is a bijection.
  """
  p = num_devices
  owner = lambda m: m if m < p else 2 * p - 1 - m  # noqa: E731
  return ([(d, owner(2 * d)) for d in range(p)], [(d, owner(2 * d + 1)) for d in range(p)])


def _check(x, axis, num_devices, load_balance):
  why = in_shard_layout_error(x.shape[axis], num_devices, load_balance)
  if why:
    raise ValueError(f"to_layout/from_layout: {why}.")


def to_layout(x, *, axis_name, num_devices: int, load_balance, axis: int = 1):
  """The local shard of the ``load_balance`` layout, from the local shard of the natural one.

  Inside ``shard_map``: ``x`` is this device's contiguous block of the sequence (dimension
  ``axis``) split over ``axis_name``; returns its block of ``x_global[:, perm]`` with
  ``perm = load_balance_permutation(...)``. None passes through.
  """
  if x is None or load_balance is None or num_devices == 1:
    return x
  _check(x, axis, num_devices, load_balance)
  x = jnp.moveaxis(x, axis, 0)
  tl = x.shape[0]
  if load_balance == "zigzag":
    even, odd = _zigzag_permutations(num_devices)
    a = lax.ppermute(x[:tl // 2], axis_name, even)  # chunk p (p even) or 2P-1-p (p odd)
    b = lax.ppermute(x[tl // 2:], axis_name, odd)
    first = lax.axis_index(axis_name) % 2 == 0
    out = jnp.concatenate([jnp.where(first, a, b), jnp.where(first, b, a)], axis=0)
  else:
    # Token i of the block goes to device i % P, at row i // P; rows arrive in device order.
    rest = x.shape[1:]
    x = x.reshape(tl // num_devices, num_devices, *rest)
    x = lax.all_to_all(x, axis_name, 1, 1, tiled=True)  # [tl/P, P (source device), ...]
    out = jnp.swapaxes(x, 0, 1).reshape(tl, *rest)
  return jnp.moveaxis(out, 0, axis)


def from_layout(x, *, axis_name, num_devices: int, load_balance, axis: int = 1):
  """Inverse of :func:`to_layout`: the natural contiguous shard from the balanced one."""
  if x is None or load_balance is None or num_devices == 1:
    return x
  _check(x, axis, num_devices, load_balance)
  x = jnp.moveaxis(x, axis, 0)
  tl = x.shape[0]
  if load_balance == "zigzag":
    even, odd = _zigzag_permutations(num_devices)
    first = lax.axis_index(axis_name) % 2 == 0
    lo, hi = x[:tl // 2], x[tl // 2:]
    a = lax.ppermute(jnp.where(first, lo, hi), axis_name, [(j, i) for i, j in even])
    b = lax.ppermute(jnp.where(first, hi, lo), axis_name, [(j, i) for i, j in odd])
    out = jnp.concatenate([a, b], axis=0)
  else:
    rest = x.shape[1:]
    x = jnp.swapaxes(x.reshape(num_devices, tl // num_devices, *rest), 0, 1)
    x = lax.all_to_all(x, axis_name, 1, 1, tiled=True)
    out = x.reshape(tl, *rest)
  return jnp.moveaxis(out, 0, axis)
