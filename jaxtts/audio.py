"""Audio in and out: read any soundfile-readable file as 24 kHz mono; write WAV, FLAC, Ogg
(Vorbis or Opus) or MP3 (libsndfile, through soundfile) atomically, the format told by the
file's extension."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from jaxtts.errors import JaxttsError

SAMPLE_RATE = 24_000


def to_mono_24k(audio: np.ndarray, sample_rate: int, *, name: str = "audio") -> np.ndarray:
    """float32 mono at 24 kHz from [L] or [L, C] samples at any rate (multi-channel mixed down).
    Integer samples are PCM, scaled to [-1, 1] as soundfile reads them (int16 / 32768)."""
    audio = np.asarray(audio)
    if audio.dtype.kind in "iu":  # cast as they are, int16 PCM would be 32768 times too loud
        info = np.iinfo(audio.dtype)
        half = (float(info.max) - float(info.min) + 1) / 2
        audio = (audio.astype(np.float64) - (float(info.min) + half)) / half
    elif audio.dtype.kind != "f":
        raise JaxttsError(f"{name}: samples must be floats in [-1, 1] (or integer PCM), got dtype {audio.dtype}")
    if audio.ndim == 2:
        if audio.shape[1] > 1:
            warnings.warn(f"{name}: {audio.shape[1]} channels mixed down to mono", stacklevel=3)
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise JaxttsError(f"{name}: expected mono [samples] or [samples, channels] audio, got shape {audio.shape}")
    if audio.size == 0:
        raise JaxttsError(f"{name}: the audio is empty")
    audio = audio.astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise JaxttsError(f"{name}: the audio holds NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import soxr

        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32)
    return audio


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Read an audio file as float32 mono 24 kHz."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise JaxttsError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise JaxttsError(f"{path}: cannot read audio ({str(e).splitlines()[0]})") from None
    return to_mono_24k(data, sr, name=str(path))


def load_audio(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """An array (at `sample_rate`) or a path → float32 mono 24 kHz."""
    if isinstance(audio, (str, os.PathLike)):
        return read_audio(audio)
    return to_mono_24k(np.asarray(audio), sample_rate)


# extension → (soundfile format, subtype). Opus and MP3 need libsndfile ≥ 1.1 (soundfile's wheels have it).
OUTPUT_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def output_format(path: str | os.PathLike) -> tuple[str, str]:
    """(format, subtype) for an output path, from its extension (a path without one is WAV)."""
    suffix = Path(path).suffix.lower()
    if suffix == "":
        return OUTPUT_FORMATS[".wav"]
    if suffix not in OUTPUT_FORMATS:
        raise JaxttsError(f"{path}: unknown audio format {suffix!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[suffix]


def encode_audio(audio: np.ndarray, fmt: str = "WAV", subtype: str = "PCM_16", sample_rate: int = SAMPLE_RATE) -> bytes:
    """The bytes of a whole file of `audio` (float mono) in one of OUTPUT_FORMATS' formats."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, _samples(_check_pcm(audio), subtype), sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _check_pcm(audio) -> np.ndarray:
    """Audio to write: float mono samples (a 2-D array would be written as that many channels)."""
    arr = np.asarray(audio)
    if arr.ndim != 1 or arr.dtype.kind != "f":
        raise JaxttsError(
            f"audio to write must be float mono samples [L], got {type(audio).__name__} of shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    if not np.all(np.isfinite(arr)):
        raise JaxttsError("audio to write holds NaN or infinite samples")
    return arr


def _samples(audio, subtype: str) -> np.ndarray:
    """Clipped float samples, or int16 for 16-bit formats: quantized here, once, so that WAV and
    FLAC hold the same integers (libsndfile scales floats differently per format)."""
    audio = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
    if subtype == "PCM_16":
        return np.round(audio * 32767.0).astype(np.int16)
    return audio


def check_output_path(path: str | os.PathLike) -> Path:
    """The output path, checked before any audio is made: its format, its directory, and that a
    file can be written there (a name too long or a read-only place fails now, not after minutes
    of generation)."""
    if not isinstance(path, (str, os.PathLike)):
        raise JaxttsError(f"output path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    output_format(path)
    try:
        if not path.parent.is_dir():
            raise JaxttsError(f"{path.parent}: no such directory for the output file")
        if path.is_dir():
            raise JaxttsError(f"{path} is a directory; give a file name such as out.wav")
        if not _is_special(path):
            probe = _temp_path(path)
            probe.open("wb").close()
            probe.unlink()
    except OSError as e:
        raise JaxttsError(f"{path}: cannot write the output file ({e.strerror or e})") from None
    return path


def _is_special(path: Path) -> bool:
    """A device or a pipe (-o /dev/null, /dev/stdout): written straight through, since renaming a
    file over it would replace the device node itself."""
    return path.exists() and not path.is_file()


def _target(path: Path) -> Path:
    """The file a path names: through a symlink its target (renaming over the link would replace it)."""
    return path.resolve() if path.is_symlink() else path


def _temp_path(path: Path) -> Path:
    path = _target(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono audio in the format of the path's extension (16-bit WAV by default) through a
    temporary file, renamed when complete: no half-written file under the real name."""
    path = check_output_path(path)
    data = encode_audio(audio, *output_format(path), sample_rate)
    if _is_special(path):
        path.write_bytes(data)
        return path
    tmp = _temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, _target(path))
    except OSError as e:
        raise JaxttsError(f"{path}: cannot write the output file ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


class StreamingAudioWriter:
    """Appends PCM chunks to an audio file (format from the extension) as they arrive.

    By default the file appears under its name only on close(). With `progressive=True` it is
    written in place so that it can be played while it grows; on failure it is removed.
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, *, progressive: bool = False):
        import soundfile as sf

        self.path = check_output_path(path)
        fmt, subtype = output_format(self.path)
        self._tmp = self.path if progressive or _is_special(self.path) else _temp_path(self.path)
        self._subtype = subtype
        self._file = sf.SoundFile(str(self._tmp), "w", samplerate=sample_rate, channels=1, subtype=subtype, format=fmt)

    def write(self, chunk: np.ndarray) -> None:
        self._file.write(_samples(_check_pcm(chunk), self._subtype))
        self._file.flush()

    def close(self) -> Path:
        self._file.close()
        if self._tmp != self.path:
            os.replace(self._tmp, _target(self.path))
        return self.path

    def abort(self) -> None:
        self._file.close()
        if not _is_special(self._tmp):  # never /dev/null
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()
