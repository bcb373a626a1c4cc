"""Pure-JAX reference of the fused NAG update (docs/methods.md §1.2-§1.3, §1.8).

This is the ground truth the Pallas kernels are tested against, and what the model runs when
`model.nag.kernel=reference`. All reductions are float32 whatever the input dtype; the new direction
is returned in the direction's dtype and the norm-lane increment in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def modulator(direction, w_cd, b_c, logits_c, beta, *, gate_floor=1e-6):
    """m = (sum_i softmax(p)_i * sigmoid(<D, W_i> + b_i)) ** beta, per token, in [0, 1].

    Computed from the sublayer's *input* direction only, so Mixture-of-Depths can read it before
    the sublayer runs. The inner sum is clamped to `gate_floor` before the power: a zero there gives
    infinite gradients in low precision.
    """
    acc = jnp.promote_types(direction.dtype, jnp.float32)
    d32 = direction.astype(acc)
    z = jnp.einsum("...d,cd->...c", d32, w_cd.astype(acc)) + b_c.astype(acc)
    mix = jnp.einsum("...c,c->...", jax.nn.sigmoid(z), jax.nn.softmax(logits_c.astype(acc)))
    return jnp.maximum(mix, gate_floor) ** beta.astype(acc)


def orthogonal_update(f, direction, *, eps=1e-6):
    """u: f centred, projected orthogonal to D and scaled to RMS 1 (docs/methods.md §1.2, steps 2-4)."""
    acc = jnp.promote_types(direction.dtype, jnp.float32)
    f32 = f.astype(acc)
    d32 = direction.astype(acc)
    f32 = f32 - jnp.mean(f32, axis=-1, keepdims=True)
    coeff = jnp.sum(f32 * d32, axis=-1, keepdims=True) / jnp.sum(d32 * d32, axis=-1, keepdims=True)
    f_perp = f32 - coeff * d32
    return f_perp * jax.lax.rsqrt(jnp.mean(f_perp * f_perp, axis=-1, keepdims=True) + eps * eps)


def nag_update(f, direction, alpha, beta, w_cd, b_c, logits_c, *, eps=1e-6, gate_floor=1e-6):
    """One NAG sublayer epilogue on rows of shape [..., d].

    Args:
      f: sublayer output F(D), any float dtype.
      direction: input direction D with RMS(D) = 1 (compute dtype, e.g. bf16).
      alpha, beta: the sublayer's scalars (beta already passed through softplus).
      w_cd, b_c, logits_c: modulator parameters, C channels.
    Returns:
      (new_direction, log_norm_increment, m): D' in D's dtype; 0.5*log1p(g^2) and m in float32
      (float64 if the inputs are float64).
    """
    acc = jnp.promote_types(direction.dtype, jnp.float32)
    d32 = direction.astype(acc)
    u = orthogonal_update(f, direction, eps=eps)
    m = modulator(d32, w_cd, b_c, logits_c, beta, gate_floor=gate_floor)
    new, dlog = _rotate(d32, u, alpha.astype(acc) * m, direction.dtype, eps)
    return new, dlog, m


def gated_update(f, direction, g, *, eps=1e-6):
    """The update at a given gain g = alpha * m per row: (D' in D's dtype, 0.5*log1p(g^2)).
    A caller that already has m (Mixture-of-Depths reads it to route) uses this directly."""
    d32 = direction.astype(jnp.promote_types(direction.dtype, jnp.float32))
    return _rotate(d32, orthogonal_update(f, direction, eps=eps), g, direction.dtype, eps)


def _rotate(d32, u, g, dtype, eps):
    """D' = normalise(D + g u) in D's dtype, and the norm lane's 0.5*log1p(g^2)."""
    new = d32 + g[..., None] * u
    new = new * jax.lax.rsqrt(jnp.mean(new * new, axis=-1, keepdims=True) + eps * eps)
    # g = 0 must be an exact identity in both lanes (a skipped sublayer), not D / RMS(D).
    new = jnp.where((g == 0)[..., None], d32, new)
    return new.astype(dtype), 0.5 * jnp.log1p(g * g)
