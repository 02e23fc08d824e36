"""`jaxtts-convert` / `python -m convert`: PyTorch checkpoints → jaxtts directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxtts.errors import ArgumentParser, JaxttsError, cli_entry


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or ArgumentParser(prog="jaxtts-convert", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True, parser_class=ArgumentParser)
    csm = sub.add_parser("csm", help="convert a CSM checkpoint (original model.safetensors or transformers format)")
    csm.add_argument("src", help="model.safetensors, a transformers checkpoint file/directory, or a sharded index")
    csm.add_argument("out", help="output directory (must not exist unless --overwrite)")
    csm.add_argument(
        "--config", help="JSON file (or inline JSON) with the sizes; required unless the checkpoint is CSM-1B"
    )
    csm.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored parameter dtype")
    csm.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="store the projections and heads as int8 with per-column float32 scales and the embedding "
        "tables as int8 with per-row scales (--dtype: the rest)",
    )
    csm.add_argument("--allow-pickle", action="store_true", help="read .pt pickles with torch (weights_only=True)")
    mimi = sub.add_parser("mimi", help="convert a Mimi codec checkpoint (moshi or transformers kyutai/mimi format)")
    mimi.add_argument("src", help="moshi tokenizer-*.safetensors, or a transformers kyutai/mimi file/directory")
    mimi.add_argument("out", help="output directory (must not exist unless --overwrite)")
    for p in (csm, mimi):
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_config_arg(value: str | None):
    from jaxtts.config import CSMConfig

    if value is None:
        return None
    if value.lstrip().startswith("{"):
        return CSMConfig.from_json(value)
    path = Path(value)
    if not path.is_file():
        raise JaxttsError(f"--config {value}: no such file")
    return CSMConfig.from_json(path.read_text())


def run(args: argparse.Namespace) -> int:
    if args.what == "csm":
        from convert.csm import convert_csm

        out = convert_csm(
            args.src,
            args.out,
            config=load_config_arg(args.config),
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=not args.quiet,
            allow_pickle=args.allow_pickle,
            quantize=args.quantize,
        )
    else:
        from convert.mimi import convert_mimi

        out = convert_mimi(args.src, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


@cli_entry(prog="jaxtts-convert")
def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))
