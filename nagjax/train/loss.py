"""Token losses without materialising the whole batch's float32 logits.

The LM head turns the final stream state into [b, t, V] float32 logits; at 32k vocabulary and 32k
tokens per step that buffer alone is 4 GiB (and its gradient another 4 GiB). `token_losses` runs
the head and the cross-entropy over chunks of positions inside a rematerialised scan, so at most
one chunk's logits exist at a time, forward or backward; the head's gradient accumulates over
chunks. Chunks cut the sequence, never the batch, so a batch-sharded state stays where it is (each
device computes its own rows' logits). The label's logit is picked with a compare-and-select over
the vocabulary, which fuses into the reduction (its gradient is a select, not an XLA scatter into
the logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from nagjax.sharding import constrain_stream

# Chunk when a batch's float32 logits would exceed this; chunks then hold at most this much.
AUTO_LOGITS_BYTES = 256 * 2**20


def cross_entropy(logits, targets):
    """Per-token cross-entropy of logits [..., V] (reduced in float32) against integer targets [...]
    (optax's; what a batch whose logits fit is trained with, so small runs stay bit-identical)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def selected_cross_entropy(logits, targets):
    """The same loss, the label's logit picked by compare-and-select: it fuses into the reduction
    and its gradient is a select, not an XLA scatter into the logits (the chunked path's)."""
    logits = logits.astype(jnp.float32)
    label = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - label


def chunk_length(rows: int, seq_len: int, vocab_size: int, setting: int) -> int:
    """Positions per chunk for `train.loss_chunk_tokens` = `setting`, the tokens of one chunk on one
    device, whose batch share is `rows` sequences (0 = auto: whole sequences while their float32
    logits fit in AUTO_LOGITS_BYTES, else chunks that do; -1 = never chunk)."""
    if setting == -1:
        return seq_len
    if setting == 0:
        if rows * seq_len * vocab_size * 4 <= AUTO_LOGITS_BYTES:
            return seq_len
        setting = AUTO_LOGITS_BYTES // (vocab_size * 4)
    return max(1, min(seq_len, setting // max(rows, 1)))


def token_losses(logits_fn, state: dict, targets_bt, chunk_len: int):
    """Cross-entropy [b, t] of `logits_fn(state)` (per-token logits from a state whose leaves are
    [b, t, ...]) over chunks of `chunk_len` positions of every sequence; whole sequences = the plain
    computation."""
    b, t = targets_bt.shape
    if chunk_len >= t:
        return cross_entropy(logits_fn(state), targets_bt)
    n_chunks = -(-t // chunk_len)
    pad = n_chunks * chunk_len - t

    def chunks(x):  # [b, t, ...] -> [n_chunks, b, chunk_len, ...] (padded positions are dropped)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, n_chunks, chunk_len) + x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint  # the backward recomputes a chunk's logits instead of saving them
    def one(_, xs):
        state_c, targets_c = xs
        return None, selected_cross_entropy(logits_fn(constrain_stream(state_c, over_stages=True)), targets_c)

    _, losses = jax.lax.scan(one, None, (jax.tree.map(chunks, state), chunks(targets_bt)))
    return losses.swapaxes(0, 1).reshape(b, n_chunks * chunk_len)[:, :t]
