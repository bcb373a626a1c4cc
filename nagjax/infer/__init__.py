"""Inference: KV-cache sampling with Mixture-of-Depths thresholds applied token by token."""
