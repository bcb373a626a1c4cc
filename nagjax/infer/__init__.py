"""Inference: one-pass prefill, KV-cache decoding that really skips the sublayers Mixture-of-Depths
thresholds skip, and batched generation (kv_cache, decode, sample)."""
