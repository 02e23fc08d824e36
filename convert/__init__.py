"""Checkpoint converters: PyTorch safetensors (original CSM, transformers, moshi) → jaxtts."""
