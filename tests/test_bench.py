"""`jaxtts bench` on the tiny preset (CPU), and the benchmark package's variants as options values."""

import ast
import json
from pathlib import Path

import jax
import pytest

from jaxtts import bench
from jaxtts.config import preset
from jaxtts.csm import CSM
from jaxtts.errors import JaxttsError
from jaxtts.options import DecodeOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return CSM.random(preset("tiny"), dtype="float32", seed=2)


def _lowered(model, opts, batch, sampler):
    """StableHLO of the decode chunk `decode_chunk(..., opts=opts)` compiles, weights as arguments."""
    from jaxtts import generation
    from jaxtts.testing import prompt_state

    state = jax.eval_shape(lambda: prompt_state(model, batch, 4, 12, opts))
    graphdef, weights = generation.split_model(model)
    table = generation.audio_table(model) if opts.audio_table and opts.pallas else None
    return generation._decode_chunk.lower(graphdef, weights, state, sampler, 1, opts, table).as_text()


def test_breakdown_pairs_are_different_programs(model):
    """The GEMV on/off and top-k sort/rank pairs are distinct options values, and each pair
    lowers to two different programs (once they were one executable timed twice)."""
    from jaxtts.sampling import Sampler

    opts = DecodeOptions(attention="pallas_interpret")
    variants = bench.breakdown_variants(opts, model.cfg)
    sampler = Sampler.create(0.9, 50)
    for a, b in (("b1_matvec_on", "b1_matvec_off"), ("b1_topk_sort", "b1_topk_rank")):
        (oa, _, ba), (ob, _, bb) = variants[a], variants[b]
        assert oa != ob and ba == bb
        assert _lowered(model, oa, ba, sampler) != _lowered(model, ob, bb, sampler), (a, b)
    assert variants["b1_matvec_on"][0].matvec and not variants["b1_matvec_off"][0].matvec
    # 64 rows of the tiny model: no fused step, no tuned GEMV config on this device: no pair
    assert "b64_matvec_on" not in variants


def test_breakdown_under_xla_has_no_gemv_pair(model):
    variants = bench.breakdown_variants(DecodeOptions(attention="xla"), model.cfg)
    assert not [n for n in variants if "matvec" in n]
    assert variants["b1_topk_sort"][0] != variants["b1_topk_rank"][0]
    assert variants["b1_unroll30"][0].depth_unroll == 30


def test_bench_cli_writes_json(capsys):
    from jaxtts.cli import main

    rc = main(
        [
            "bench",
            "--preset",
            "tiny",
            "--dtype",
            "float32",
            "--frames",
            "8",
            "--chunk",
            "4",
            "--batches",
            "1,2",
            "--skip",
            "compile",
            "--prompt-tokens",
            "20",
            "--json",
            "-",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads(out[out.index("\n{\n") + 1 :])
    assert res["ms_per_frame"] > 0 and res["frames_timed"] == 8
    assert res["first_audio_ms"] > 0
    assert set(res["batch_sweep"]) == {"1", "2"} and all("ms_per_step" in r for r in res["batch_sweep"].values())
    assert res["options"]["attention"] == "xla"


def test_compare_names():
    assert bench.parse_peers("transformers, original,transformers") == ["transformers", "original"]
    assert bench.parse_peers(None) == []
    with pytest.raises(JaxttsError, match="unknown"):
        bench.parse_peers("pytorch")


def test_library_does_not_import_benchmarks_at_module_level():
    for path in (ROOT / "jaxtts").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not [n for n in names if n.split(".")[0] == "benchmarks"], path


def test_probe_variants_are_options_values():
    from benchmarks import decode_probe
    from pallas_kernels.matvec import MatvecConfig

    base = DecodeOptions(attention="pallas")
    for name in [*decode_probe.VARIANTS, *decode_probe.HOST_VARIANTS]:
        opts, host = decode_probe.variant_options(base, name)
        hash(opts)
        assert set(host) <= {"fresh_split"}
    assert decode_probe.variant_options(base, "no_fused")[0] == base.replace(fused_step=False)
    tuned = decode_probe.as_matvec_tuned({(64, 2048, 2048): MatvecConfig(64, 64, 4, 4, 4, "dot")})
    opts = base.replace(matvec_tuned=tuned)
    assert opts.tuned_matvec(40, 2048, 2048) == (64, 64, 4, 4, 4, "dot")
    assert opts.uses_matvec(64, 2048, 2048) and not opts.uses_matvec(64, 2048, 1024)
    with pytest.raises(SystemExit):
        decode_probe.variant_options(base, "no_such_variant")
