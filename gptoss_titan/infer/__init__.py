"""Inference: KV-cached generation through the model's own forward, and the sampling command line."""
