"""Titans 2-layer MLP memory Pallas kernels for TPU (Mosaic): the chunked forward and backward.

The memory is M(x) = silu(x W1) W2 (W1 [d_k, d_h], W2 [d_h, d_v], no biases), each matrix with
its own momentum (S1, S2) and the same gates. The math of one chunk is ``xla.chunk_step`` at
depth 2 (see ``xla.py``), with the decay terms of ``tpu.py`` (``_Terms``: LA, LE, W = LA LE,
A, c and the end-of-chunk terms, from exact segment sums of the log gates). Per (batch, head)
and chunk (W1, W2, S1, S2 at the chunk start, end row n):

    Z1 = K W1, X1 = silu(Z1), D2 = X1 W2 - V, D1 = (D2 W2^T) * silu'(Z1)    keys at W^0
    R1 = A (Q W1) + c (Q S1) - ((Q K^T) * W theta_row) D1,     Y1 = silu(R1)
    O  = A (Y1 W2) + c (Y1 S2) - ((Y1 X1^T) * W theta_row) D2
    W_l' = a_n W_l + c_n S_l - X_{l-1}^T ((W[n, :] theta) D_l),  S_l' = e_n S_l - X_{l-1}^T
           ((LE[n, :] theta) D_l)                                 (X_0 = K)

written once as a pure 2-D function of the chunk (``_chunk``). The backward does not derive
it by hand: per chunk it calls ``jax.vjp`` of that function inside the kernel body (Mosaic
lowers the transposed products, selects and reductions like the forward's), with the
cotangents of the four state matrices carried across chunks in VMEM scratch.

Layouts and grid follow ``tpu.py``: q, k [b, h, T, d_k], v [b, h, T, d_v] (T whole chunks)
reshaped to [b, h, chunks, C, d], the gates to [b, h, chunks, 3, C] float32 rows; grid
(batch, heads, groups), the group axis "arbitrary", a group of ``stride`` chunks walked in a
``fori_loop`` (``tpu.group_stride`` with the widest of d_k, d_h, d_v). No d_v tiles: the
first layer's columns all meet every value column through D1.

  forward   W1, W2, S1, S2 in float32 VMEM scratch, carried across groups. Writes o (input
            dtype), the final state (at the last valid token) and, for the backward, the
            four matrices entering every group only ([b, h, groups, ...] each).
  backward  the groups in reverse, the cotangents of the four matrices leaving the current
            chunk in VMEM scratch. Per group it recomputes the states entering each of its
            chunks from the saved group state (state update only) into [stride, ...]
            scratch, then walks the chunks backwards: ``jax.vjp`` of ``_chunk`` gives dq,
            dk, dv, the gate cotangents (rows) and the cotangents of the chunk-start state.

Precision (``_mm``, a custom-VJP matmul, so the backward's products follow the same rule):
float32 inputs: every product at HIGHEST precision. bfloat16 inputs: bfloat16 operands go to
the MXU as they are; a float32 operand (a state, a state cotangent, an error D_l or any
cotangent) is split into hi + lo bfloat16 halves, with float32 accumulation: two passes for
float32 x bfloat16, three (hi hi, hi lo, lo hi) for float32 x float32. The activations X1,
Y1 and the [C, C] intra-chunk weights are rounded to bfloat16 where they enter a product
(as flash attention rounds P); the decay matrices stay float32 (HIGHEST), as in ``tpu.py``.

VMEM: the states (and, in the backward, their cotangents and ``stride`` recomputed copies)
are whole matrices in VMEM, so d_k, d_v <= ``MAX_DIM`` = 128 and d_h <= ``MAX_HIDDEN`` = 256
(d = 128 with the paper's hidden multiple 2 fits; the float32 backward at d_k = d_v = 64,
d_h = 512 needs about 21 MiB of VMEM and at d_k = d_v = 256, d_h = 128 about 16.3 MiB, over
v4's 16); larger memories are a ValueError (``size_problem``) and run the XLA path under
``implementation=None``. Chunks: multiples of 8 up to ``MAX_CHUNK`` = 128 (at 256 the
bfloat16 backward fails a RET_CHECK inside libtpu's compiler).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common.numerics import dot, silu_and_grad
from pallas_kernels.titans_memory import tpu
from pallas_kernels.titans_memory.tpu import _NN, _NT, _TN, _Geo, _Terms

__all__ = ["chunk_size_problem", "size_problem", "titans_mlp_forward", "titans_mlp_backward"]

MAX_DIM = 128  # d_k, d_v at most (whole float32 matrices in VMEM, v4's 16 MiB the tightest)
MAX_HIDDEN = 256  # d_h at most
MAX_CHUNK = 128  # at 256 the bfloat16 backward trips a Mosaic RET_CHECK (libtpu, v5e)
_F32 = jnp.float32


def chunk_size_problem(chunk: int) -> str | None:
  """None if the kernels tile ``chunk`` tokens per chunk, else why not."""
  if chunk % tpu.CHUNK_MULTIPLE or chunk > MAX_CHUNK:
    return (f"chunk_size {chunk} (the TPU kernels of the 2-layer MLP memory tile multiples "
            f"of {tpu.CHUNK_MULTIPLE} up to {MAX_CHUNK})")
  return None


def size_problem(d_k: int, d_h: int, d_v: int) -> str | None:
  """None if the kernels hold a d_k x d_h x d_v memory in VMEM, else why not."""
  if max(d_k, d_v) > MAX_DIM or d_h > MAX_HIDDEN:
    return (f"a 2-layer MLP memory with d_k={d_k}, d_h={d_h}, d_v={d_v} (the TPU kernels "
            f"hold d_k, d_v <= {MAX_DIM} and d_h <= {MAX_HIDDEN} in VMEM, e.g. d_k = d_v = "
            "128 with d_h = 256)")
  return None


# --------------------------------------------------------------------------------------------
# Chunk math (2-D values).


def _halves(x, cdt):
  """A float32 operand as (hi, lo) in ``cdt``; a ``cdt`` operand as (x,)."""
  if x.dtype != _F32:
    return (x,)
  hi = x.astype(cdt)
  return hi, (x - hi.astype(_F32)).astype(cdt)


def _mm_impl(a, b, dims, cdt):
  if cdt == _F32:
    return dot(a.astype(_F32), b.astype(_F32), dims)  # HIGHEST precision
  pa, pb = _halves(a, cdt), _halves(b, cdt)
  out = None
  for i, x in enumerate(pa):
    for j, y in enumerate(pb):
      if i + j > 1:  # lo x lo: below float32 accumulation's noise
        continue
      term = dot(x, y, dims, precision=None)
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mm(a, b, dims, cdt):
  """a @ b (``dims`` one of _NN, _NT, _TN) in float32, under the precision rule above."""
  return _mm_impl(a, b, dims, cdt)


def _mm_fwd(a, b, dims, cdt):
  return _mm_impl(a, b, dims, cdt), (a, b)


def _mm_bwd(dims, cdt, res, g):
  a, b = res
  if dims == _NN:  # a [m, k], b [k, n]
    da, db = _mm_impl(g, b, _NT, cdt), _mm_impl(a, g, _TN, cdt)
  elif dims == _NT:  # a [m, k], b [n, k]
    da, db = _mm_impl(g, b, _NN, cdt), _mm_impl(g, a, _TN, cdt)
  else:  # _TN: a [k, m], b [k, n]
    da, db = _mm_impl(b, g, _NT, cdt), _mm_impl(a, g, _NN, cdt)
  return da.astype(a.dtype), db.astype(b.dtype)


_mm.defvjp(_mm_fwd, _mm_bwd)


def _chunk(geo, cdt, n, with_output, q, k, v, theta_row, lk_row, le_row, w1, w2, s1, s2):
  """One chunk: (o float32 [C, d_v] or None, (W1', W2', S1', S2')).

  q, k, v in ``cdt`` or float32 (the backward passes float32, so that the contributions to
  their cotangents add in float32; q unused without output); gates [1, C] float32; states
  float32.
  """
  t = _Terms(geo, lk_row, le_row, n, full=with_output)
  mm = functools.partial(_mm, cdt=cdt)
  k = k.astype(cdt)
  z1 = mm(k, w1, _NN)  # [C, d_h]: the keys through the chunk-start memory
  x1 = jax.nn.silu(z1)
  x1c = x1.astype(cdt)
  d2 = mm(x1c, w2, _NN) - v.astype(_F32)  # [C, d_v]: the errors
  d1 = mm(d2, w2, _NT) * silu_and_grad(z1)[1]  # [C, d_h]: backpropagated through the SiLU
  o = None
  if with_output:
    q = q.astype(cdt)
    lr_w = t.w_mat * theta_row  # [i, t]
    b1 = (mm(q, k, _NT) * lr_w).astype(cdt)
    r1 = t.a_col * mm(q, w1, _NN) + t.c_col * mm(q, s1, _NN) - mm(b1, d1, _NN)
    y1 = jax.nn.silu(r1).astype(cdt)
    b2 = (mm(y1, x1c, _NT) * lr_w).astype(cdt)
    o = t.a_col * mm(y1, w2, _NN) + t.c_col * mm(y1, s2, _NN) - mm(b2, d2, _NN)
  theta_col = geo.column(theta_row)
  g_col = t.wn_col * theta_col  # the end state's weights of the tokens' errors
  h_col = t.en_col * theta_col
  new = []
  for x, d, w, s in ((k, d1, w1, s1), (x1c, d2, w2, s2)):
    new.append((t.a_n * w + t.c_n * s - mm(x, g_col * d, _TN),
                t.e_n * s - mm(x, h_col * d, _TN)))
  (nw1, ns1), (nw2, ns2) = new
  return o, (nw1, nw2, ns1, ns2)


# --------------------------------------------------------------------------------------------
# Kernels.


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _gate_rows(g_ref, sub):
  return tuple(g_ref[sub, pl.ds(r, 1), :] for r in range(3))


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, stride, last_chunk, last_row,
                    return_states):
  init_refs, final_refs = refs[:4], refs[5:9]
  o_ref = refs[4]
  rest = refs[9:]
  saved_refs = rest[:4] if return_states else ()
  scr = rest[-4:]
  grp = pl.program_id(2)
  c = q_ref.shape[1]
  cdt = q_ref.dtype
  geo = _Geo(c)

  @pl.when(grp == 0)
  def _init():
    for dst, src in zip(scr, init_refs):
      dst[...] = src[...]

  for dst, src in zip(saved_refs, scr):
    dst[...] = src[...]

  def body(sub, carry):
    chunk = grp * stride + sub
    is_last = chunk == last_chunk
    n = jnp.where(is_last, last_row, c - 1)
    o, new = _chunk(geo, cdt, n, True, q_ref[sub], k_ref[sub], v_ref[sub],
                    *_gate_rows(g_ref, sub), *(r[...] for r in scr))
    o_ref[sub] = o.astype(o_ref.dtype)
    for r, x in zip(scr, new):
      r[...] = x

    @pl.when(is_last)
    def _final():
      for r, x in zip(final_refs, new):
        r[...] = x

    return carry

  lax.fori_loop(0, stride, body, 0)


def _backward_kernel(q_ref, k_ref, v_ref, g_ref, *refs, stride, num_groups, last_chunk,
                     last_row):
  saved_refs, do_ref, dfinal_refs = refs[:4], refs[4], refs[5:9]
  dq_ref, dk_ref, dv_ref, dg_ref = refs[9:13]
  dinit_refs = refs[13:17]
  dscr, sscr = refs[17:21], refs[21:25]
  step = pl.program_id(2)
  grp = num_groups - 1 - step
  c = q_ref.shape[1]
  cdt = q_ref.dtype
  geo = _Geo(c)

  @pl.when(step == 0)
  def _init():
    for r in dscr:
      r[...] = jnp.zeros(r.shape, _F32)

  # The states entering the group's chunks, from the one saved at its start. (Chunks after
  # the last valid token get states too; their cotangents are zero.)
  for dst, src in zip(sscr, saved_refs):
    dst[0] = src[...]

  def recompute(sub, carry):
    _, new = _chunk(geo, cdt, c - 1, False, None, k_ref[sub], v_ref[sub],
                    *_gate_rows(g_ref, sub), *(r[sub] for r in sscr))
    for r, x in zip(sscr, new):
      r[sub + 1] = x
    return carry

  if stride > 1:
    lax.fori_loop(0, stride - 1, recompute, 0)

  def body(i, carry):
    sub = stride - 1 - i
    chunk = grp * stride + sub
    is_last = chunk == last_chunk
    n = jnp.where(is_last, last_row, c - 1)
    # The final state's cotangent enters at the last valid token; later chunks carry zeros.
    d_new = tuple(jnp.where(is_last, f[...], d[...]) for f, d in zip(dfinal_refs, dscr))
    primals = (q_ref[sub].astype(_F32), k_ref[sub].astype(_F32), v_ref[sub].astype(_F32),
               *_gate_rows(g_ref, sub),
               *(r[sub] for r in sscr))
    _, vjp = jax.vjp(functools.partial(_chunk, geo, cdt, n, True), *primals)
    grads = vjp((do_ref[sub].astype(_F32), d_new))
    dq, dk, dv, d_theta, d_lk, d_le = grads[:6]
    dq_ref[sub] = dq.astype(dq_ref.dtype)
    dk_ref[sub] = dk.astype(dk_ref.dtype)
    dv_ref[sub] = dv.astype(dv_ref.dtype)
    dg_ref[sub, pl.ds(0, 1), :] = d_theta
    dg_ref[sub, pl.ds(1, 1), :] = d_lk
    dg_ref[sub, pl.ds(2, 1), :] = d_le
    for r, x in zip(dscr, grads[6:]):
      r[...] = x
    return carry

  lax.fori_loop(0, stride, body, 0)

  @pl.when(step == num_groups - 1)
  def _finish():
    for dst, src in zip(dinit_refs, dscr):
      dst[...] = src[...]


# --------------------------------------------------------------------------------------------
# Wrappers.


class _Plan(tpu._Plan):
  """``tpu._Plan`` with one d_v tile, grid (batch, heads, groups) and groups sized by the
  widest of d_k, d_h, d_v."""

  def __init__(self, t, dk, dh, dv, chunk_size, seq_len):
    super().__init__(t, dk, dv, chunk_size, seq_len)
    self.dh = dh
    self.bv, self.tiles = dv, 1
    self.stride = tpu.group_stride(self.nc, chunk_size, max(dk, dh), max(dv, dh))
    self.num_groups = -(-self.nc // self.stride)
    self.nc_pad = self.num_groups * self.stride
    self.grid = lambda b, h: (b, h, self.num_groups)

  def _group(self, reverse):
    g = self.num_groups
    return (lambda gi: g - 1 - gi) if reverse else (lambda gi: gi)

  def chunk_spec(self, d, reverse=False):
    grp = self._group(reverse)
    return pl.BlockSpec((None, None, self.stride, self.c, d),
                        lambda bi, hi, gi: (bi, hi, grp(gi), 0, 0))

  def gate_spec(self, reverse=False):
    grp = self._group(reverse)
    return pl.BlockSpec((None, None, self.stride, 3, self.c),
                        lambda bi, hi, gi: (bi, hi, grp(gi), 0, 0))

  def shapes(self):
    return ((self.dk, self.dh), (self.dh, self.dv)) * 2  # W1, W2, S1, S2

  def state_specs(self):
    return [pl.BlockSpec((None, None) + s, lambda bi, hi, gi: (bi, hi, 0, 0))
            for s in self.shapes()]

  def group_state_specs(self, reverse=False):
    grp = self._group(reverse)
    return [pl.BlockSpec((None, None, None) + s, lambda bi, hi, gi: (bi, hi, grp(gi), 0, 0))
            for s in self.shapes()]


def _kernel_dtype(x):
  return x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else _F32


def titans_mlp_forward(q, k, v, theta, log_keep, log_eta, w1, w2, s1, s2, *, chunk_size,
                       seq_len, interpret=False, return_states=False):
  """o [b, h, T, d_v] in the input dtype, the final (W1, W2, S1, S2) float32 and (if asked)
  the residual states for ``titans_mlp_backward`` (the four matrices entering every group of
  chunks, float32 [b, h, groups, ...] each), else None. d_k, d_h, d_v must be nonzero."""
  b, h, t, dk = q.shape
  dh, dv = w1.shape[3], v.shape[3]
  cdt = _kernel_dtype(q)
  plan = _Plan(t, dk, dh, dv, chunk_size, seq_len)
  states = [a.astype(_F32) for a in (w1, w2, s1, s2)]
  args = [plan.chunks(a.astype(cdt)) for a in (q, k, v)]
  args += [plan.gates(theta, log_keep, log_eta), *states]
  in_specs = [plan.chunk_spec(dk), plan.chunk_spec(dk), plan.chunk_spec(dv),
              plan.gate_spec(), *plan.state_specs()]
  out_specs = [plan.chunk_spec(dv), *plan.state_specs()]
  out_shape = [jax.ShapeDtypeStruct((b, h, plan.nc_pad, plan.c, dv), cdt)]
  out_shape += [jax.ShapeDtypeStruct((b, h) + s, _F32) for s in plan.shapes()]
  if return_states:
    out_specs += plan.group_state_specs()
    out_shape += [jax.ShapeDtypeStruct((b, h, plan.num_groups) + s, _F32)
                  for s in plan.shapes()]
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, stride=plan.stride, last_chunk=plan.last_chunk,
                        last_row=plan.last_row, return_states=return_states),
      grid=plan.grid(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(s, _F32) for s in plan.shapes()],
      compiler_params=_compiler_params(), interpret=interpret, name="lclm_titans_mlp_fwd",
  )(*args)
  o = plan.unchunk(outs[0])
  saved = tuple(outs[5:9]) if return_states else None
  return o, tuple(outs[1:5]), saved


def titans_mlp_backward(q, k, v, theta, log_keep, log_eta, states, d_o, d_final, *,
                        chunk_size, seq_len, interpret=False):
  """(dq, dk, dv, dtheta, dlog_keep, dlog_eta, (dW1, dW2, dS1, dS2)) in the shapes and
  dtypes of the inputs (gates and states float32). ``states``: the forward's residuals;
  ``d_final``: the cotangents of the final (W1, W2, S1, S2)."""
  b, h, t, dk = q.shape
  dh, dv = states[0].shape[4], v.shape[3]
  cdt = _kernel_dtype(q)
  plan = _Plan(t, dk, dh, dv, chunk_size, seq_len)
  args = [plan.chunks(a.astype(cdt)) for a in (q, k, v)]
  args += [plan.gates(theta, log_keep, log_eta), *states, plan.chunks(d_o.astype(cdt)),
           *(a.astype(_F32) for a in d_final)]
  qk_spec, v_spec = plan.chunk_spec(dk, reverse=True), plan.chunk_spec(dv, reverse=True)
  in_specs = [qk_spec, qk_spec, v_spec, plan.gate_spec(reverse=True),
              *plan.group_state_specs(reverse=True), v_spec, *plan.state_specs()]
  gates_spec = pl.BlockSpec((None, None, plan.stride, 3, plan.c),
                            lambda bi, hi, gi: (bi, hi, plan.num_groups - 1 - gi, 0, 0))
  out_specs = [qk_spec, qk_spec, v_spec, gates_spec, *plan.state_specs()]
  chunked = lambda d: jax.ShapeDtypeStruct((b, h, plan.nc_pad, plan.c, d), cdt)
  out_shape = [chunked(dk), chunked(dk), chunked(dv),
               jax.ShapeDtypeStruct((b, h, plan.nc_pad, 3, plan.c), _F32)]
  out_shape += [jax.ShapeDtypeStruct((b, h) + s, _F32) for s in plan.shapes()]
  scratch = [pltpu.VMEM(s, _F32) for s in plan.shapes()]
  scratch += [pltpu.VMEM((plan.stride,) + s, _F32) for s in plan.shapes()]
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, stride=plan.stride, num_groups=plan.num_groups,
                        last_chunk=plan.last_chunk, last_row=plan.last_row),
      grid=plan.grid(b, h), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=scratch, compiler_params=_compiler_params(), interpret=interpret,
      name="lclm_titans_mlp_bwd",
  )(*args)
  dq, dkk, dvv, dg = outs[:4]
  dg = jnp.moveaxis(dg[:, :, :plan.nc], 3, 2).reshape(b, h, 3, t)
  return (plan.unchunk(dq).astype(q.dtype), plan.unchunk(dkk).astype(k.dtype),
          plan.unchunk(dvv).astype(v.dtype), dg[:, :, 0], dg[:, :, 1], dg[:, :, 2],
          tuple(outs[4:8]))
