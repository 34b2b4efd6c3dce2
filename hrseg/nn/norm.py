"""Training-mode normalization with hand-written backward passes (``jax.custom_vjp``).

Two reasons not to let autodiff differentiate ``(x - mean) * rsqrt(var + eps) * γ + β``:

* memory: autodiff keeps float32 copies of ``x - mean`` and of the normalized tensor. Here
  :func:`normalize` keeps only ``x`` in the compute dtype, and :func:`inplace_abn` (in-place
  activated batch norm, Rota Bulò et al. 2018) keeps only its *output* ``y`` — which the next
  convolution keeps anyway — and recovers the normalized input in the backward pass:

      x̂ = (φ⁻¹(y) − β) / (|γ| + ε)

  (the forward scales by ``|γ| + ε`` so that the map is always invertible);
* precision: in bf16/fp16 the batch-norm gradient is a small difference of large terms; it is
  formed here in float32 and rounded once.

Statistics are those of the *global* tensor: halo.moments psums them over the bound mesh axes
(``"data"`` and the spatial axes for batch norm, spatial only for group/instance norm), and the
two reductions of the backward pass, Σ dẑ and Σ dẑ·x̂, are psum'd over the same axes. Parameter
gradients are typed like the parameters (halo.cotangent_like): under ``check_vma=True`` a
replicated parameter's gradient is psum'd here; with ``check_vma=False`` it is returned per
shard and shard_map's transpose sums it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hrseg.parallel import halo, partition, uneven

GAMMA_EPS = 1e-5  # in-place ABN scales by |γ| + GAMMA_EPS: never zero, always invertible
INVERTIBLE = ("leaky_relu", "elu", "identity")


def forward_act(z, name: str, slope: float):
    if name == "leaky_relu":
        return jnp.where(z >= 0, z, slope * z)
    if name == "elu":
        return jnp.where(z > 0, z, jnp.expm1(jnp.minimum(z, 0.0)))
    if name == "identity":
        return z
    raise ValueError(f"in-place ABN needs an invertible activation {INVERTIBLE}, got '{name}'")


def _invert_act(y, name: str, slope: float):
    """φ⁻¹(y) and φ'(φ⁻¹(y)), both from the output alone."""
    if name == "leaky_relu":
        neg = y < 0
        return jnp.where(neg, y / slope, y), jnp.where(neg, slope, 1.0)
    if name == "elu":  # y = e^z − 1 for z ≤ 0, so φ' = y + 1 there
        neg = y <= 0
        z = jnp.log1p(jnp.maximum(y, -1.0 + 1e-7))
        return jnp.where(neg, z, y), jnp.where(neg, y + 1.0, 1.0)
    return y, jnp.ones_like(y)


def effective_scale(gamma):
    return jnp.abs(gamma) + GAMMA_EPS


def _count(x, axes, mesh_axes, ext):
    """Voxels of the global tensor over ``axes`` (an uneven shard's padding not counted)."""
    return halo.psum(uneven.valid_count(x, axes, ext), mesh_axes)


def _drop_padding(dx, ext):
    """No gradient to an uneven shard's padding: the conv before the norm would carry it
    across the true border (forward, halo.conv zeroes the padding it reads)."""
    return uneven.zero_padding(dx, ext)


def _stats(x, axes, mesh_axes, eps, ext):
    mean, var = halo.moments(x, axes, mesh_axes, ext)
    return mean, var, jax.lax.rsqrt(var + eps)


def _backward(xhat, dxhat, inv, axes, mesh_axes, count):
    """dL/dx of x̂ = (x − mean)·inv with global statistics, given dL/dx̂ (all float32)."""
    mean_d = halo.psum(jnp.sum(dxhat, axes, keepdims=True), mesh_axes) / count
    mean_dx = halo.psum(jnp.sum(dxhat * xhat, axes, keepdims=True), mesh_axes) / count
    return inv * (dxhat - mean_d - xhat * mean_dx)


def _like_primals(cts, primals):
    """Cotangents typed like their primals under ``check_vma=True``: a replicated γ/β's
    gradient is summed over the mesh here (with ``check_vma=False``, by shard_map)."""
    return tuple(halo.cotangent_like(c, halo.varying(p)) for c, p in zip(cts, primals))


def _param_grads(dz, xhat, gamma):
    """Per-shard Σ dz·x̂ and Σ dz over every axis that ``gamma`` broadcasts over."""
    lead = tuple(range(dz.ndim - gamma.ndim))
    return jnp.sum(dz * xhat, lead), jnp.sum(dz, lead)


# --- normalization that keeps its input -----------------------------------------------------

def normalize(x, gamma, beta, axes: tuple[int, ...], mesh_axes: tuple[str, ...], eps: float):
    """``γ·(x − mean)/√(var + eps) + β`` with statistics over ``axes`` of the global tensor.

    ``gamma``/``beta`` broadcast against the trailing dims of ``x`` (``(C,)`` for batch norm,
    ``(G, C/G)`` for group norm on ``x`` reshaped to ``(B, *S, G, C/G)``). Returns ``(z, mean,
    var)``: ``z`` in ``x.dtype``, float32 statistics (keepdims) without gradient. Inside a
    step on an uneven shape, its padding (uneven.py) is left out of the statistics and gets
    no gradient.
    """
    return _normalize(x, gamma, beta, axes, mesh_axes, eps, uneven.current())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _normalize(x, gamma, beta, axes, mesh_axes, eps, ext):
    return _normalize_fwd(x, gamma, beta, axes, mesh_axes, eps, ext)[0]


def _normalize_fwd(x, gamma, beta, axes, mesh_axes, eps, ext):
    mean, var, inv = _stats(x, axes, mesh_axes, eps, ext)
    z = ((x.astype(jnp.float32) - mean) * inv * gamma + beta).astype(x.dtype)
    return (z, mean, var), (x, gamma, beta, mean, inv)  # beta: only its type (check_vma)


def _normalize_bwd(axes, mesh_axes, eps, ext, res, cts):
    x, gamma, beta, mean, inv = res
    dz = cts[0].astype(jnp.float32)  # statistics only feed running averages: no cotangent
    xhat = (halo.after(x, dz).astype(jnp.float32) - mean) * inv
    dx = _backward(xhat, dz * gamma, inv, axes, mesh_axes, _count(x, axes, mesh_axes, ext))
    dx = _drop_padding(dx, ext)
    dgamma, dbeta = _param_grads(dz, xhat, gamma)
    return _like_primals((dx.astype(x.dtype), dgamma, dbeta), (x, gamma, beta))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


# --- in-place activated batch norm: keeps only its output -----------------------------------

def inplace_abn(x, gamma, beta, eps: float, act: str, slope: float,
                mesh_axes: tuple[str, ...] = partition.AXES):
    """``φ((|γ| + ε)·x̂ + β)`` with batch statistics; returns ``(y, mean, var)``.

    ``x (B, *S, C)``; statistics over batch and space of the global tensor; ``y`` in
    ``x.dtype``; ``mean``/``var`` float32 ``(C,)``, for the running averages only. An uneven
    shard's padding is handled as in :func:`normalize`.
    """
    return _inplace_abn(x, gamma, beta, eps, act, slope, mesh_axes, uneven.current())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _inplace_abn(x, gamma, beta, eps, act, slope, mesh_axes, ext):
    return _abn_fwd(x, gamma, beta, eps, act, slope, mesh_axes, ext)[0]


def _abn_fwd(x, gamma, beta, eps, act, slope, mesh_axes, ext):
    axes = tuple(range(x.ndim - 1))
    mean, var, inv = _stats(x, axes, mesh_axes, eps, ext)
    z = (x.astype(jnp.float32) - mean) * (inv * effective_scale(gamma)) + beta
    y = forward_act(z, act, slope).astype(x.dtype)
    # Saved: y (shared with the next conv, which keeps its input anyway) + O(C) numbers.
    return (y, mean.reshape(-1), var.reshape(-1)), (y, gamma, beta, inv)


def _abn_bwd(eps, act, slope, mesh_axes, ext, res, cts):
    y, gamma, beta, inv = res
    axes = tuple(range(y.ndim - 1))
    # x̂ is recovered here, in the backward pass (halo.after), and nowhere kept
    z, dphi = _invert_act(halo.after(y, cts[0]).astype(jnp.float32), act, slope)
    g = effective_scale(gamma)
    xhat = (z - beta) / g
    dz = cts[0].astype(jnp.float32) * dphi
    dx = _backward(xhat, dz * g, inv, axes, mesh_axes, _count(y, axes, mesh_axes, ext))
    dx = _drop_padding(dx, ext)
    dg, dbeta = _param_grads(dz, xhat, gamma)
    # y stands in for x (not kept): it varies over x's mesh axes (γ, β are replicated)
    return _like_primals((dx.astype(y.dtype), dg * jnp.sign(gamma), dbeta), (y, gamma, beta))


_inplace_abn.defvjp(_abn_fwd, _abn_bwd)


def inplace_abn_reference(x, gamma, beta, eps: float, act: str, slope: float,
                          mesh_axes: tuple[str, ...] = partition.AXES):
    """The same function through plain autodiff (for tests and memory comparisons)."""
    axes = tuple(range(x.ndim - 1))
    mean, var = halo.moments(x, axes, mesh_axes)
    z = (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + eps) * effective_scale(gamma))
    y = forward_act(z + beta, act, slope).astype(x.dtype)
    return y, jax.lax.stop_gradient(mean.reshape(-1)), jax.lax.stop_gradient(var.reshape(-1))
