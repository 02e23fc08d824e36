"""jaxtts: Sesame's CSM-1B conversational speech model and Kyutai's Mimi codec in JAX."""

from jaxtts.config import CSM_1B, CSMConfig, LlamaConfig
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.generation import generate_frames
from jaxtts.options import DecodeOptions, default_options
from jaxtts.prompt import Segment
from jaxtts.sampling import Sampler
from jaxtts.tts import TTS, Context, Request, load


def __getattr__(name):
    # Mimi is imported lazily: `import jaxtts` stays light for users of the CSM parts alone.
    if name == "Mimi":
        from jaxtts.mimi import Mimi

        return Mimi
    raise AttributeError(name)


__all__ = [
    "CSM",
    "CSM_1B",
    "CSMConfig",
    "Context",
    "DecodeOptions",
    "JaxttsError",
    "LlamaConfig",
    "Mimi",
    "Request",
    "Sampler",
    "Segment",
    "TTS",
    "default_options",
    "generate_frames",
    "load",
]
__version__ = "0.1.0"
