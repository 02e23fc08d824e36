"""Measurements, not the library: GPU checks and sweeps of the Pallas kernels, decode-loop A/B
probes, fine-tuning and Mimi benchmarks, the PyTorch peers `jaxtts bench --compare` times, and the
CUPTI kernel profile behind `jaxtts bench --kernels`. See benchmarks/README.md.

Sits above the library: modules here import jaxtts and pallas_kernels, never the other way round
(`jaxtts.bench` imports from here only inside the functions behind --compare and --kernels).
Variants are `jaxtts.DecodeOptions` values (`default_options().replace(...)`), never patched
module globals.
"""
