"""The `jaxtts` command: speak, convert, download, env, bench, finetune."""

from __future__ import annotations

import argparse
import sys

from jaxtts import defaults
from jaxtts.errors import ArgumentParser, JaxttsError, cli_entry
from jaxtts.quantize import add_quantize_argument


def _add_speak(sub):
    p = sub.add_parser("speak", help="speak TEXT into an audio file")
    p.add_argument("text", nargs="?", help="what to say (omit with --interactive)")
    p.add_argument(
        "-o",
        "--output",
        default="out.wav",
        help="output file; the extension picks the format: .wav .flac .ogg .opus .mp3 "
        "('-' writes WAV to stdout; default out.wav)",
    )
    p.add_argument("--model", help="converted CSM directory or checkpoint (default: jaxtts / Hugging Face cache)")
    p.add_argument("--codec", help="converted Mimi directory or checkpoint (default: caches)")
    p.add_argument("--speaker", type=int, default=None, help="speaker id (default: the voice's, else 0)")
    p.add_argument("--voice", help="a stored voice (jaxtts voice add): its speaker and turns come first")
    p.add_argument(
        "--context",
        nargs=3,
        action="append",
        metavar=("AUDIO", "TEXT", "SPEAKER"),
        default=[],
        help="a voice-prompt turn: audio file, its transcript, its speaker (repeatable)",
    )
    p.add_argument("--temperature", type=float, default=defaults.TEMPERATURE, help="0 is greedy (default 0.9)")
    p.add_argument("--top-k", type=int, default=defaults.TOP_K)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--max-audio-ms", type=float, default=defaults.MAX_AUDIO_MS)
    p.add_argument("--seed", type=int, default=None, help="unsigned 32-bit; fix for reproducible output")
    defaults.add_dtype_argument(p)
    add_quantize_argument(p)
    p.add_argument(
        "--attention",
        default=None,
        choices=["xla", "pallas"],
        help="attention implementation (default: pallas on GPU, xla elsewhere)",
    )
    p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="where to run (default: GPU if JAX has one)")
    p.add_argument("--long-form", action="store_true", help="split long text into sentences, each continuing the last")
    p.add_argument("--stream", action="store_true", help="write the file progressively as audio is generated")
    p.add_argument("--interactive", action="store_true", help="speak each line typed (model loaded once)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random full-size weights to check an install: the output is noise",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _read_context(items):
    from jaxtts.audio import read_audio
    from jaxtts.prompt import Segment

    segments = []
    for wav, text, speaker in items:
        try:
            speaker = int(speaker)
        except ValueError:
            raise JaxttsError(f"--context {wav}: speaker must be an integer, got {speaker!r}") from None
        segments.append(Segment(speaker, text, read_audio(wav)))
    return segments


def _check_speak_args(args) -> None:
    """Everything cheap is checked before gigabytes of weights load."""
    from jaxtts import validation
    from jaxtts.prompt import validate_speaker, validate_text
    from jaxtts.sampling import Sampler

    if args.interactive and args.text is not None:
        raise JaxttsError("give TEXT or --interactive, not both")
    if not args.interactive:
        if args.text is None:
            raise JaxttsError("give TEXT to speak, or --interactive")
        validate_text(args.text)
    if args.random_weights and (args.model or args.codec):
        raise JaxttsError("--random-weights builds its own weights: drop --model/--codec, or drop --random-weights")
    if args.output == "-" and args.interactive:
        raise JaxttsError("-o - (stdout) takes one line; --interactive writes numbered files: give -o NAME.wav")
    if args.output == "-" and args.stream:
        raise JaxttsError("--stream writes a growing file; stdout gets the whole WAV at the end: drop --stream")
    if args.speaker is not None:
        validate_speaker(args.speaker)
    if args.voice is not None:
        from jaxtts.voices import VoiceStore, validate_name

        if not VoiceStore().path(validate_name(args.voice)).is_dir():
            raise JaxttsError(f"no voice named {args.voice!r} (`jaxtts voice list` shows the stored ones)")
    Sampler.create(args.temperature, args.top_k, args.top_p, args.min_p)
    validation.number("--max-audio-ms", args.max_audio_ms, low=80)
    validation.seed(args.seed, "--seed")


def _speak(args) -> int:
    from jaxtts.audio import StreamingAudioWriter, check_output_path, encode_audio

    defaults.allocate_on_demand()  # before anything starts the backend (the checks below may)
    _check_speak_args(args)
    out = None if args.output == "-" else check_output_path(args.output)
    context = _read_context(args.context)
    from jaxtts.environment import select_device

    select_device(args.device)
    if args.attention is not None:  # a kernel choice this device cannot run fails before the weights load
        from jaxtts.options import default_options

        default_options(attention=args.attention)

    from jaxtts.tts import TTS

    if args.random_weights:
        print("note: --random-weights: full-size random weights, the output is noise", file=sys.stderr)
    tts = TTS.load(
        args.model,
        args.codec,
        dtype=args.dtype,
        quantize=args.quantize,
        random_weights=args.random_weights,
        progress=not args.quiet,
        attention=args.attention,
    )
    speaker = 0 if args.speaker is None else args.speaker
    if args.voice is not None:
        from jaxtts.voices import with_voice

        speaker, context = with_voice(args.voice, args.speaker, context, codec=tts.codec)
    kwargs = dict(
        speaker=speaker,
        max_audio_ms=args.max_audio_ms,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
    )
    if args.long_form:  # each sentence re-prefills; the voice prompt is encoded once, here
        kwargs.update(context=[tts.encode_segment(s) for s in context], long_form=True)
    else:
        kwargs.update(context=tts.prepare_context(context) if context else None)

    def speak_one(text: str, path) -> None:
        if path is None:
            sys.stdout.buffer.write(encode_audio(tts.generate(text, **kwargs)))
            sys.stdout.buffer.flush()
            return
        samples = 0
        if args.stream:
            with StreamingAudioWriter(path, progressive=True) as writer:
                for chunk in tts.stream(text, **kwargs):
                    writer.write(chunk)
                    samples += len(chunk)
        else:
            audio = tts.generate(text, **kwargs)
            tts.save(path, audio)
            samples = len(audio)
        if not args.quiet:  # counted, not read back: /dev/null has no duration
            print(f"wrote {path} ({samples / tts.sample_rate:.2f} s)", file=sys.stderr)

    if not args.interactive:
        speak_one(args.text, out)
        return 0
    n = 0
    print("type a line to speak it (empty line or Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        n += 1
        try:
            speak_one(line, out.with_name(f"{out.stem}-{n:03d}{out.suffix or '.wav'}"))
        except JaxttsError as e:
            print(f"error: {e}", file=sys.stderr)
    return 0


def _env(args) -> int:
    from jaxtts.environment import report

    print(report(), end="")
    return 0


def _download(args) -> int:
    from jaxtts.hub import download

    csm, mimi = download(progress=not args.quiet, token=args.token)
    print(f"CSM: {csm}\nMimi: {mimi}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from convert.cli import build_parser as build_convert_parser

    parser = ArgumentParser(prog="jaxtts", description="CSM-1B text-to-speech in JAX")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_speak(sub)
    conv = sub.add_parser("convert", help="convert PyTorch checkpoints (same as jaxtts-convert)")
    build_convert_parser(conv)
    dl = sub.add_parser("download", help="fetch sesame/csm-1b and Kyutai's Mimi from the hub and convert them")
    dl.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    dl.add_argument("--quiet", action="store_true")
    sub.add_parser("env", help="what jaxtts finds on this machine: devices, versions, kernels, caches, weights")
    from jaxtts.bench import add_bench_parser

    add_bench_parser(sub)
    from jaxtts.finetune.cli import add_finetune_parser

    add_finetune_parser(sub)
    from jaxtts.server import add_serve_parser

    add_serve_parser(sub)
    from jaxtts.voices import add_voice_parser

    add_voice_parser(sub)
    return parser


@cli_entry
def main(argv=None) -> int:
    # --debug may come anywhere; cli_entry has read it already
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]
    args = build_parser().parse_args(argv)
    if args.command == "speak":
        return _speak(args)
    if args.command == "convert":
        from convert.cli import run

        return run(args)
    if args.command == "download":
        return _download(args)
    if args.command == "env":
        return _env(args)
    if args.command == "serve":
        if args.ray:
            from jaxtts.ray_serve import run_ray_serve

            return run_ray_serve(args)
        from jaxtts.server import run_serve

        return run_serve(args)
    if args.command == "voice":
        from jaxtts.voices import run_voice

        return run_voice(args)
    if args.command == "finetune":
        from jaxtts.finetune.cli import run_finetune

        return run_finetune(args)
    if args.command == "bench":
        from jaxtts.bench import run_bench

        return run_bench(args)
    raise JaxttsError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
