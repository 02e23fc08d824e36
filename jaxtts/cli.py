"""The `jaxtts` command: speak, convert, download, bench."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxtts.errors import ArgumentParser, JaxttsError, cli_entry


def _add_speak(sub):
    p = sub.add_parser("speak", help="speak TEXT into a WAV file")
    p.add_argument("text", nargs="?", help="what to say (omit with --interactive)")
    p.add_argument("-o", "--output", default="out.wav", help="output WAV path (default out.wav)")
    p.add_argument("--model", help="converted CSM directory or checkpoint (default: jaxtts / Hugging Face cache)")
    p.add_argument("--codec", help="converted Mimi directory or checkpoint (default: caches)")
    p.add_argument("--speaker", type=int, default=0, help="speaker id (default 0)")
    p.add_argument("--context", nargs=3, action="append", metavar=("WAV", "TEXT", "SPEAKER"), default=[],
                   help="a voice-prompt turn: audio file, its transcript, its speaker (repeatable)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--max-audio-ms", type=float, default=90_000)
    p.add_argument("--seed", type=int, default=None, help="fix for reproducible output")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="parameter dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--attention", default=None, choices=["xla", "pallas"],
                   help="attention implementation (default: pallas on GPU, xla elsewhere)")
    p.add_argument("--long-form", action="store_true", help="split long text into sentences, each continuing the last")
    p.add_argument("--stream", action="store_true", help="write the WAV progressively as audio is generated")
    p.add_argument("--interactive", action="store_true", help="speak each line typed (model loaded once)")
    p.add_argument("--random-weights", action="store_true",
                   help="random full-size weights to check an install: the output is noise")
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


def _speak(args) -> int:
    from jaxtts.audio import StreamingWavWriter, check_output_path
    from jaxtts.prompt import validate_speaker, validate_text
    from jaxtts.sampling import Sampler

    # Check everything cheap before loading gigabytes of weights.
    if not args.interactive:
        if args.text is None:
            raise JaxttsError("give TEXT to speak, or --interactive")
        validate_text(args.text)
    validate_speaker(args.speaker)
    Sampler.create(args.temperature, args.top_k, args.top_p, args.min_p)
    out = check_output_path(args.output)
    context = _read_context(args.context)

    from jaxtts.tts import TTS

    if args.random_weights:
        print("note: --random-weights: full-size random weights, the output is noise", file=sys.stderr)
    tts = TTS.load(args.model, args.codec, dtype=args.dtype, random_weights=args.random_weights,
                   progress=not args.quiet, attention=args.attention)
    ctx = tts.prepare_context(context) if context else None
    kwargs = dict(speaker=args.speaker, context=ctx, max_audio_ms=args.max_audio_ms, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed)
    if args.long_form:
        kwargs.update(context=context, long_form=True)

    def speak_one(text: str, path: Path) -> None:
        if args.stream:
            writer = StreamingWavWriter(path, progressive=True)
            with writer:
                for chunk in tts.stream(text, **kwargs):
                    writer.write(chunk)
        else:
            tts.save(path, tts.generate(text, **kwargs))
        if not args.quiet:
            import soundfile as sf

            print(f"wrote {path} ({sf.info(str(path)).duration:.2f} s)")

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


def _download(args) -> int:
    from jaxtts.hub import download

    csm, mimi = download(progress=not args.quiet, token=args.token)
    print(f"CSM: {csm}\nMimi: {mimi}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from convert.cli import build_parser as build_convert_parser

    parser = ArgumentParser(prog="jaxtts", description="CSM-1B text-to-speech in JAX")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    _add_speak(sub)
    conv = sub.add_parser("convert", help="convert PyTorch checkpoints (same as jaxtts-convert)")
    build_convert_parser(conv)
    dl = sub.add_parser("download", help="fetch sesame/csm-1b and Kyutai's Mimi from the hub and convert them")
    dl.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    dl.add_argument("--quiet", action="store_true")
    from jaxtts.bench import add_bench_parser

    add_bench_parser(sub)
    from jaxtts.finetune.cli import add_finetune_parser

    add_finetune_parser(sub)
    return parser


@cli_entry
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "speak":
        return _speak(args)
    if args.command == "convert":
        from convert.cli import run

        return run(args)
    if args.command == "download":
        return _download(args)
    if args.command == "finetune":
        from jaxtts.finetune.cli import run_finetune

        return run_finetune(args)
    if args.command == "bench":
        from jaxtts.bench import run_bench

        return run_bench(args)
    raise JaxttsError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
