"""Offline per-expert safetensors shards: prepare, verify, and the tiered restore path."""
