"""Audio in and out: resampling, mix-down, validation, atomic writes."""

import numpy as np
import pytest
import soundfile as sf

from jaxtts.audio import StreamingAudioWriter, load_audio, read_audio, write_audio
from jaxtts.errors import JaxttsError


def test_stereo_48k_file_becomes_mono_24k_with_a_warning(tmp_path):
    t = np.arange(48_000) / 48_000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(tmp_path / "s.wav"), np.stack([tone, tone], axis=1), 48_000)
    with pytest.warns(UserWarning, match="2 channels mixed down"):
        audio = read_audio(tmp_path / "s.wav")
    assert audio.dtype == np.float32 and audio.shape == (24_000,)
    # Still a 440 Hz tone after resampling: its spectrum peaks there.
    peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * 24_000 / len(audio)
    assert abs(peak_hz - 440) < 2


def test_array_input_and_validation():
    assert load_audio(np.zeros(1000, np.float32)).shape == (1000,)
    with pytest.raises(JaxttsError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(JaxttsError, match="NaN"):
        load_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(JaxttsError, match="shape"):
        load_audio(np.zeros((2, 3, 4), np.float32))


def test_write_wav_is_atomic_and_exact_length(tmp_path):
    pcm = np.linspace(-1, 1, 1920 * 3, dtype=np.float32)
    path = write_audio(tmp_path / "x.wav", pcm)
    data, sr = sf.read(str(path))
    assert sr == 24_000 and len(data) == 1920 * 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]
    with pytest.raises(JaxttsError, match="no such directory"):
        write_audio(tmp_path / "missing" / "x.wav", pcm)


def test_streaming_writer_removes_its_file_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with StreamingAudioWriter(tmp_path / "s.wav", progressive=True) as w:
            w.write(np.zeros(1920, np.float32))
            assert (tmp_path / "s.wav").exists()  # progressive: playable while it grows
            raise RuntimeError("generation failed")
    assert list(tmp_path.iterdir()) == []
    with StreamingAudioWriter(tmp_path / "t.wav") as w:
        w.write(np.zeros(1920, np.float32))
        w.write(np.ones(1920, np.float32) * 0.5)
    assert len(sf.read(str(tmp_path / "t.wav"))[0]) == 3840
