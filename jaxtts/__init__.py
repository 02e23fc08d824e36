"""jaxtts: Sesame's CSM-1B conversational speech model and Kyutai's Mimi codec in JAX."""

from jaxtts.config import CSM_1B, CSMConfig, LlamaConfig
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.generation import generate_frames
from jaxtts.options import DecodeOptions, default_options
from jaxtts.prompt import Segment
from jaxtts.sampling import Sampler
from jaxtts.tts import TTS, Context, Request, load

_LAZY = {"Mimi": "jaxtts.mimi", "Engine": "jaxtts.engine", "Busy": "jaxtts.engine", "VoiceStore": "jaxtts.voices"}


def __getattr__(name):
    # Imported on first use: `import jaxtts` stays light for users of the CSM parts alone.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [
    "Busy",
    "CSM",
    "CSM_1B",
    "CSMConfig",
    "Context",
    "DecodeOptions",
    "Engine",
    "JaxttsError",
    "LlamaConfig",
    "Mimi",
    "Request",
    "Sampler",
    "Segment",
    "TTS",
    "VoiceStore",
    "default_options",
    "generate_frames",
    "load",
]
__version__ = "0.1.0"
