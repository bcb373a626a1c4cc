"""Attention Residuals (docs/methods.md §4, Kimi Team arXiv 2603.15031): softmax mixing over depth.

Instead of adding every sublayer output into one stream, each sublayer reads a per-token softmax
mixture of earlier *sources*: the embedding, the sums of completed blocks of `S` sublayer outputs,
and the running partial sum of the current block (`model.attnres.block_size` = S, counted in
sublayers; S = 1 is Full AttnRes, every sublayer output its own source):

    a_i = softmax_i(<w_l, RMSNorm_l(v_i)>),   h_l = sum_i a_i v_i,   out_l = F_l(Norm_l(h_l))

with a pseudo-query w_l per sublayer initialised to zero (uniform weights), a key RMSNorm with its
own gain per sublayer, no 1/sqrt(d) and no heads. The final output gets its own query and key norm
before the final norm. The mixture is scaled by the number n of visible sources before it meets a
norm (`DepthRouter.__call__`): every consumer is an RMSNorm, so this only divides its eps by n^2,
and the zero-query model computes the Pre-LN function exactly at initialisation (n x the mean of
the sources is the Pre-LN stream), at any `model.norm_eps`.

Fixed-size buffer (so the stack stays one `lax.scan`): the state holds `sources` [b, t, N, d] in
float32 with N = 1 + ceil(2 * L / S) slots (slot 0 = embedding, slot 1 + l // S = the block that
sublayer l, 0-based over the whole stack, writes into) and `filled` [b, t, N], which marks the
slots already written. Logits of unfilled slots are masked, so at sublayer l the visible sources
are exactly the embedding, the completed blocks and the partial block (§4 [default] indexing:
0-based sublayer counter, no completed block at the start, the embedding its own source). Mixing,
softmax and accumulation run in float32; the sublayer itself runs in the compute dtype.

Sublayer indices come from the *original* block index (`model.block_ids`), so a pruned model
(`nagjax prune`) keeps each remaining output in its original slot: removing a block is exactly
"its outputs are never written", and slots that nothing writes stay masked.

Cost and memory: every sublayer normalises and scores all N slots (masked ones included: that is
the executed work the FLOP counter reports). The scan saves the buffer per block for the backward
pass, O(L * N * b * t * d) floats: use Block AttnRes (S = 2L / 8 keeps N ~ 9, "most of the gain")
for deep models; Full AttnRes is O(L^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from nagjax.config import ConfigError, ModelConfig, SchemeOptions
from nagjax.model.layers import RMSNorm, compute_dtype, mean_rms, param, rms_normalize
from nagjax.model.residual.base import MicroscopeStat, Scheme, State, StepContext, Sublayer
from nagjax.model.residual.prenorm import sublayer_row_flops as prenorm_row_flops


@dataclass(frozen=True)
class AttnResConfig(SchemeOptions):
    """`model.attnres.*`: the depth-wise softmax over earlier sublayer outputs (§4)."""

    block_size: int = 1  # sublayers per source block (counts sublayers, not Transformer blocks); 1 = Full

    def validate(self, prefix: str = "model.attnres") -> None:
        if self.block_size < 1:
            raise ConfigError(f"{prefix}.block_size: must be >= 1 (1 = Full AttnRes)")


def n_sources(cfg: ModelConfig) -> int:
    """Slots of the source buffer: the embedding + one per block of S sublayers."""
    sublayers = 2 * (max(cfg.executed_index_list) + 1)  # executed positions on a looped stack
    return 1 + math.ceil(sublayers / cfg.attnres.block_size)


def _stream_of(sources_btnd):
    """The Pre-LN-equivalent stream: the sum of all sources (unfilled slots are zero)."""
    return jnp.sum(sources_btnd, axis=2)


class DepthRouter(nnx.Module):
    """One depth-attention read: zero-init pseudo-query and a key RMSNorm with learnable gain."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.query = param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ("embed",))
        self.key_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)

    def weights(self, state: State):
        """Mixing weights [b, t, N] over the buffer slots (float32, zero on unfilled slots)."""
        sources = state["sources"]
        keys = rms_normalize(sources, self.key_norm.eps) * self.key_norm.scale[...]
        logits = jnp.einsum("btnd,d->btn", keys, self.query[...])
        logits = jnp.where(state["filled"] > 0, logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1)

    def __call__(self, state: State):
        """h [b, t, d] float32 = n * sum_i a_i v_i over the n visible sources, and the weights.

        The factor n (§4 [default]) changes nothing the paper specifies: every consumer of h is an
        RMSNorm, so n * h only divides that norm's eps by n^2. It makes the zero-query model the
        Pre-LN function exactly (n * mean of the sources = the Pre-LN stream, eps and all) instead
        of shrinking the mixed input to 1/n of the stream, where eps = 1e-6 is no longer small
        against its mean square (~5e-6 at init with 9 sources)."""
        w = self.weights(state)
        visible = jnp.sum(state["filled"], axis=-1, keepdims=True)
        return jnp.einsum("btn,btnd->btd", w, state["sources"]) * visible, w


class AttnResStream(nnx.Module):
    """Embedding -> buffer slot 0; the head reads a final depth mixture through the final norm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        self.final_router = DepthRouter(cfg, rngs=rngs)
        self.n_sources = n_sources(cfg)
        self.dtype = compute_dtype(cfg)

    def embedding_table(self, raw_vd):
        return raw_vd

    def encode(self, embeddings_btd) -> State:
        b, t, d = embeddings_btd.shape
        sources = jnp.zeros((b, t, self.n_sources, d), jnp.float32)
        sources = sources.at[:, :, 0].set(embeddings_btd.astype(jnp.float32))
        filled = jnp.zeros((b, t, self.n_sources), jnp.float32).at[:, :, 0].set(1.0)
        return {"sources": sources, "filled": filled}

    def final_hidden(self, state: State):
        h, _ = self.final_router(state)
        return self.final_norm(h.astype(self.dtype))

    def logits(self, state: State, head_vd):
        h = state["hidden"] if "hidden" in state else self.final_hidden(state)
        return jnp.einsum("btd,vd->btv", h, head_vd.astype(h.dtype))

    def head_inputs(self, state: State) -> State:
        """The final mixture through the final norm, [b, t, d]: not the [b, t, N, d] source buffer."""
        return {"hidden": self.final_hidden(state)}

    def residual_vector(self, state: State):
        return _stream_of(state["sources"])


class AttnResResidual(nnx.Module):
    """Per block: the two sublayers' pre-norms (as Pre-LN) and their depth routers."""

    def __init__(self, cfg: ModelConfig, block_index, *, rngs: nnx.Rngs):
        del block_index  # sublayer indices come from the scanned (original) block index
        self.norms = nnx.List([RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs) for _ in range(2)])
        self.routers = nnx.List([DepthRouter(cfg, rngs=rngs) for _ in range(2)])
        self.block_size = cfg.attnres.block_size
        self.dtype = compute_dtype(cfg)

    def slot_of(self, block_index, slot: int):
        """Buffer slot that sublayer (block_index, slot) writes: 1 + l // S, l = 2 * block + slot."""
        return 1 + (2 * jnp.asarray(block_index, jnp.int32) + slot) // self.block_size

    def __call__(self, state: State, sublayer: Sublayer, positions_bt, slot: int, block_index,
                 ctx: StepContext):
        del ctx
        sources, filled = state["sources"], state["filled"]
        h, weights = self.routers[slot](state)
        x_prev = _stream_of(sources)
        f = sublayer(self.norms[slot](h.astype(self.dtype)), positions_bt, kv=None).astype(jnp.float32)
        k = self.slot_of(block_index, slot)
        current = jax.lax.dynamic_index_in_dim(sources, k, axis=2, keepdims=False)
        sources = jax.lax.dynamic_update_index_in_dim(sources, current + f, k, axis=2)
        filled = jax.lax.dynamic_update_index_in_dim(filled, jnp.ones_like(filled[:, :, 0]), k, axis=2)
        visible = jnp.sum(state["filled"], axis=-1)
        entropy = -jnp.sum(jnp.where(weights > 0, weights * jnp.log(jnp.maximum(weights, 1e-30)), 0.0), -1)
        stats = {
            "stream_rms": mean_rms(x_prev + f),
            "update_ratio": mean_rms(f) / (mean_rms(x_prev) + 1e-12),
            "mix_embed_weight": jnp.mean(weights[:, :, 0]),  # weight on the embedding source
            # 1 = uniform over the visible sources (the init), 0 = all weight on one source
            "mix_entropy_ratio": jnp.mean(
                jnp.where(visible > 1, entropy / jnp.log(jnp.maximum(visible, 2.0)), 1.0)),
            "mix_weights": jnp.mean(weights, axis=(0, 1)),  # [N] over the buffer slots
        }
        return {"sources": sources, "filled": filled}, stats


class AttnResCrossStage:
    """What crosses a pipeline stage boundary under Attention Residuals (nagjax/model/pipeline.py):
    the block summaries the receiving stage does not hold yet, not the whole source buffer.

    A stage keeps the buffer of each microbatch as it left the stage (the pipeline's `kept`). Under
    the circular schedule it sees a microbatch again p pieces later, so the message into piece q
    is only the slots written since its previous piece q - p: slots slot(2 (q-p+1) k) ..
    slot(2 q k - 1) of the sublayer counter (the first of them the partial block it may have left
    unfinished); on a microbatch's first visit (q < p) the slots 0 .. slot(2 q k - 1). Every
    message is a window of one static width W starting at a per-piece base, so a hop carries
    W of the N slots: over the p v hops of a microbatch about N p + ... slots instead of N p v
    (docs/pipeline.md works the numbers). `filled` [b, t, N] is small and crosses whole.
    """

    def __init__(self, cfg: ModelConfig, schedule):
        k, p, pieces = schedule.per_piece, schedule.stages, schedule.pieces
        size = cfg.attnres.block_size
        n = n_sources(cfg)

        def slot(sublayer: int) -> int:
            return 1 + sublayer // size

        spans = []
        for q in range(pieces + 1):
            lo = 0 if q < p else slot(2 * (q - p + 1) * k)
            hi = 0 if q == 0 else slot(2 * q * k - 1)
            spans.append((lo, min(hi, n - 1)))
        self.width = min(n, max(hi - lo + 1 for lo, hi in spans))
        # a window that would run past the buffer starts earlier (re-sending held slots is harmless)
        self.bases = tuple(min(lo, n - self.width) for lo, _ in spans)
        self.sources = n

    def _base(self, piece):
        return jnp.asarray(self.bases, jnp.int32)[piece]

    def send(self, state: State, piece):
        window = jax.lax.dynamic_slice_in_dim(state["sources"], self._base(piece), self.width, axis=2)
        return {"window": window, "filled": state["filled"]}

    def receive(self, kept: State, message, piece) -> State:
        sources = jax.lax.dynamic_update_slice_in_dim(kept["sources"], message["window"], self._base(piece), axis=2)
        return {"sources": sources, "filled": message["filled"]}


def mix_flops(cfg: ModelConfig) -> float:
    """Row work of one depth-mixing read: per buffer slot (all N are executed, masked ones
    included) key RMSNorm 4d, score 2d, weighted sum 2d, stream sum for stats 1d, softmax ~5."""
    return n_sources(cfg) * (9.0 * cfg.d_model + 5.0)


ATTNRES = Scheme(
    name="attnres",
    description="Attention Residuals: each sublayer reads a softmax mixture over depth of earlier outputs",
    stream=AttnResStream,
    block_residual=AttnResResidual,
    # the pre-norm and the add into the source buffer, plus the mixing read before every sublayer
    sublayer_row_flops=lambda cfg, executed: prenorm_row_flops(cfg, executed) + mix_flops(cfg),
    final_row_flops=mix_flops,  # the final aggregation before the final norm
    microscope={"mix_weights": MicroscopeStat(
        "mix_weights", "AttnRes depth-mixing weights (source 0 = embedding, k = block of sublayer outputs)",
        heatmap=True)},
    options=AttnResConfig,
    cross_stage=AttnResCrossStage,
)
