"""Defaults in one place: what every loader, generator and command uses when not told otherwise."""

from __future__ import annotations

TEMPERATURE = 0.9
TOP_K = 50
MAX_AUDIO_MS = 90_000  # 1125 frames; context + text + audio must still fit 2048 positions
MAX_SILENCE_MS = 3000  # stop a row after this much trailing silence (None: never)
CHUNK_FRAMES = 8  # frames per compiled decode call once audio flows (streaming granularity)
FIRST_CHUNK_FRAMES = 1  # the first call returns after one frame: low time to first audio
PROGRESS = True  # progress bars for downloads, conversion and long generations


def default_dtype(platform: str | None = None) -> str:
    """Parameter dtype for a platform (default: JAX's default backend): bfloat16 where it is
    fast (GPUs, TPUs); float32 on CPUs, which emulate bfloat16 slowly."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return "float32" if platform == "cpu" else "bfloat16"


def add_dtype_argument(parser) -> None:
    """`--dtype` for the commands that load models (jaxtts speak, jaxtts serve)."""
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float32"],
        help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
