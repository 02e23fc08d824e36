"""`jaxtts bench` on the tiny preset (CPU), and the benchmark package's variants as options values."""

import ast
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
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


def test_breakdown_of_an_int8_model_times_each_int8_convert(model):
    from jaxtts.options import INT8_CONVERTS

    opts = DecodeOptions(attention="pallas_interpret")
    variants = bench.breakdown_variants(opts, model.cfg, "int8")
    assert [variants[f"b1_int8_{how}"][0].int8_convert for how in INT8_CONVERTS] == list(INT8_CONVERTS)
    assert not [n for n in bench.breakdown_variants(opts, model.cfg) if "int8" in n]  # bf16 model: none
    assert not [n for n in bench.breakdown_variants(opts.replace(int8_kernels=False), model.cfg, "int8") if "int8" in n]


def test_breakdown_only_keeps_the_named_variants_and_b1(model):
    opts = DecodeOptions(attention="pallas_interpret")
    variants = bench.breakdown_variants(opts, model.cfg, "int8")
    assert list(bench.select_variants(variants, "b1_int8_asm, b1_greedy")) == ["b1", "b1_greedy", "b1_int8_asm"]
    assert bench.select_variants(variants, None) == variants
    with pytest.raises(JaxttsError, match="no variant b1_fast.*choose from b1, "):
        bench.select_variants(variants, "b1_fast")


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


def test_bench_cli_times_several_weight_formats_in_one_run(capsys):
    """--quantize none,int8: both variants in one process, each with its own timings and memory."""
    from jaxtts.cli import main

    # batch 1 in the sweep too: its programs are the batch-1 timing's (one compilation per variant)
    argv = ["bench", "--preset", "tiny", "--dtype", "float32", "--frames", "4", "--chunk", "4", "--batches", "1"]
    rc = main([*argv, "--skip", "compile,latency", "--prompt-tokens", "12", "--quantize", "none,int8", "--json", "-"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ms/frame, batch 1" in out and "peak GB, batch-1 timing" in out  # the side-by-side table
    res = json.loads(out[out.index("\n{\n") + 1 :])
    assert res["quantize"] == ["none", "int8"] and list(res["variants"]) == ["none", "int8"]
    for name, r in res["variants"].items():
        assert r["quantize"] == name and r["ms_per_frame"] > 0 and r["frames_timed"] == 4
        assert set(r["batch_sweep"]) == {"1"} and r["batch_sweep"]["1"]["ms_per_step"] > 0
        # CPU: no device memory statistics; the keys are there for a GPU's figures
        assert {"memory_loaded_gb", "peak_memory_gb_load", "peak_memory_gb_batch1", "peak_memory_gb"} <= set(r)
    assert "ms_per_frame" not in res  # per variant only
    with pytest.raises(JaxttsError, match="--quantize: unknown int4"):
        bench.parse_quantize("none,int4")
    assert bench.parse_quantize(None) == [None] and bench.parse_quantize("int8, int8") == ["int8"]


class FakeDevice:
    """A device allocator's statistics: bytes in use and the peak, which only grows."""

    def __init__(self, in_use, peak):
        self.in_use, self.peak = in_use, peak

    def stats(self):
        return {"bytes_in_use": self.in_use, "peak_bytes_in_use": self.peak}

    def alloc(self, n):
        n = -(-n // 256) * 256  # rounded up, as an allocator does
        self.in_use += n
        self.peak = max(self.peak, self.in_use)
        dev = self

        class Buf:
            def delete(self):
                dev.in_use -= n

        return [Buf()]

    def run(self, extra):
        """A phase that allocates `extra` bytes at its highest, then frees them."""
        self.alloc(extra)[0].delete()


def test_memory_phase_measures_each_phase_own_peak():
    gb = 10**9
    # An earlier phase peaked at 10 GB; this one holds 2 GB and needs 1 GB more at most.
    dev = FakeDevice(2 * gb, 10 * gb)
    with bench.MemoryPhase(dev.stats, dev.alloc) as phase:
        dev.run(1 * gb)
    assert phase.start == 2 * gb and abs(phase.peak - 3 * gb) < 1024 and dev.in_use == 2 * gb
    # A phase above the earlier peak, and one that allocates nothing.
    with bench.MemoryPhase(dev.stats, dev.alloc) as phase:
        dev.run(20 * gb)
    assert abs(phase.peak - 22 * gb) < 1024
    with bench.MemoryPhase(dev.stats, dev.alloc) as phase:
        pass
    assert phase.peak == 2 * gb

    def no_memory(n):
        raise MemoryError

    # No room for the ballast: a phase below the old peak is unknown, one above it is measured.
    with bench.MemoryPhase(dev.stats, no_memory) as phase:
        dev.run(1 * gb)
    assert phase.peak is None
    with bench.MemoryPhase(dev.stats, no_memory) as phase:
        dev.run(30 * gb)
    assert phase.peak == 32 * gb
    # No statistics (a CPU).
    with bench.MemoryPhase(lambda: None, dev.alloc) as phase:
        pass
    assert phase.peak is None and phase.start is None and phase.peak_gb is None


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


def test_original_peer_runs_its_frame_loop_on_cpu():
    """The 'original' peer of `--compare` (eager here; its torch.compile recipes need a GPU to mean
    anything): the torchtune replica generates frames and reports its time per frame."""
    from benchmarks.peers import time_original
    from jaxtts.config import preset

    res = time_original(preset("tiny"), dtype="float32", prompt_tokens=8, frames=2, compile=False)
    assert res["original_device"] == "cpu" and res["original_dtype"] == "float32"
    assert res["original_eager_ms"] > 0 and "original_compiled_ms" not in res


def test_mosaic_probes_lower_for_cuda():
    """The GPU-only probes of docs/PERF.md #25, #50, #57 still trace and lower for CUDA here (the
    Mosaic GPU lowering runs at trace time), so a JAX upgrade that breaks them shows on CPU."""
    from benchmarks.mgpu_barrier_probe import barrier_kernel, neighbour_kernel

    for fn, name in [
        (barrier_kernel(4, 8), "barrier_probe"),
        (neighbour_kernel(4, 8), "neighbour_probe_1"),
        (neighbour_kernel(4, 16, fan_in=8), "neighbour_probe_8"),
    ]:
        assert name in fn.trace().lower(lowering_platforms=("cuda",)).as_text()


def test_stream_probe_modes_lower_for_cuda_and_add_up_interpreted():
    """benchmarks.mgpu_stream_probe: every mode lowers for CUDA at a full-size W (one program per
    SM, uneven runs for the ring modes), and in the interpreter (which runs the warp-specialized
    pipeline's two warpgroups and checks their barriers) every mode's sums match the reference;
    the copy mode computes nothing."""
    import functools

    import jax.numpy as jnp
    import numpy as np

    from benchmarks.mgpu_stream_probe import MODES, stream, stream_reference

    w = jax.ShapeDtypeStruct((8192, 4224), jnp.bfloat16)
    for mode in MODES:
        fn = jax.jit(functools.partial(stream, blocks=132, stages=8, block_k=128, mode=mode))
        assert f"stream_{mode}" in fn.trace(w).lower(lowering_platforms=("cuda",)).as_text()
    with pytest.raises(ValueError, match="evenly"):
        stream(w, blocks=130, stages=4, block_k=128, mode="pipeline")
    small = jax.random.normal(jax.random.key(0), (512, 256), jnp.bfloat16)
    for mode in MODES:  # the ring modes over uneven runs; the pipelines need even ones
        blocks = 2 if mode.startswith("pipeline") else 3
        got = np.asarray(stream(small, blocks=blocks, stages=3, block_k=128, mode=mode, interpret=True))
        want = 0 * got if mode == "copy" else np.asarray(stream_reference(small, blocks, 128))
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2, err_msg=mode)


def test_pdl_probe_summary_counts_runs_and_early_starts():
    """benchmarks.mgpu_pdl_probe.summarize: runs cut after each `calls`-th GEMV (with the fusion
    after it), span and busy per call, and a GEMV that starts before the kernel before it ends."""
    from benchmarks.mgpu_pdl_probe import summarize

    ns = 1000  # events in ns; results in µs
    events = [  # two runs of two GEMVs, each followed by a fusion
        (0, 10 * ns, "matvec_mgpu"),
        (10 * ns, 2 * ns, "fusion"),
        (11 * ns, 10 * ns, "matvec_mgpu"),  # starts before the fusion ends: early
        (21 * ns, 1 * ns, "fusion"),
        (100 * ns, 10 * ns, "matvec_mgpu"),
        (112 * ns, 1 * ns, "fusion"),
        (113 * ns, 10 * ns, "matvec_mgpu"),
        (123 * ns, 1 * ns, "fusion"),
    ]
    r = summarize(events, calls=2)
    assert r["runs"] == 2 and r["busy_us"] == 10.0
    assert r["span_us"] == 11.5  # median of 22/2 and 24/2
    assert r["early_share"] == 0.5
    assert "error" in summarize(events[:2], calls=2)  # one GEMV: no whole run


def test_phase_profile_summary_nests_and_orders_scopes(tmp_path):
    """benchmarks.between_attention_check.summarise_trace: Mosaic GPU's trace (begin / end events
    per program) as one row per scope path, ordered by median start, with durations and the last
    end, relative to the first event."""
    from benchmarks.between_attention_check import summarise_trace

    events = []
    for tid, off, gemv_us in ((1, 0.0, 2.0), (2, 1.0, 4.0), (3, 2.0, 3.0)):
        events += [
            {"name": "P1", "ph": "B", "ts": 10 + off, "tid": tid},
            {"name": "gemv", "ph": "B", "ts": 11 + off, "tid": tid},
            {"name": "gemv", "ph": "E", "ts": 11 + off + gemv_us, "tid": tid},
            {"name": "P1", "ph": "E", "ts": 16 + off, "tid": tid},
        ]
    events.insert(0, {"name": "fill", "ph": "B", "ts": 9.0, "tid": 1})
    events.insert(1, {"name": "fill", "ph": "E", "ts": 9.5, "tid": 1})
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    rows = summarise_trace(str(path))[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| fill", "| P1", "| P1 / gemv"]
    # P1 / gemv: 3 programs, median start 11+1-9 = 3, median 3 µs, max 4, last end 11+1+4-9 = 7
    assert rows[2] == "| P1 / gemv | 3 | 3.00 | 3.00 | 4.00 | 7.00 |"


def test_l2_prefetch_probe_chain_traces():
    """benchmarks.l2_prefetch_probe: each layer of the chain is [prefetch], fillers, the big GEMV
    (traced at full size on CPU: one l2_prefetch per layer with prefetching, none without)."""
    from benchmarks.l2_prefetch_probe import N_SMALL, K, N, chain

    spec = jax.ShapeDtypeStruct
    args = (spec((1, K), jnp.bfloat16), [spec((K, N), jnp.bfloat16)] * 3, [spec((K, N_SMALL), jnp.bfloat16)] * 3)
    for blocks, fillers in ((64, 2), (None, 0)):
        jaxpr = jax.make_jaxpr(lambda x, ws, ss: chain(x, ws, ss, prefetch_blocks=blocks, fillers=fillers))(*args)
        names = [eqn.params.get("name") for eqn in jaxpr.eqns]
        assert names.count("l2_prefetch") == (3 if blocks else 0)
        assert names.count("matvec") == 3 * (1 + fillers)


def test_weight_layout_probe_kernels_match_their_reference():
    """benchmarks.weight_layout_probe (docs/PERF.md #73, #75): every layout × work × dtype computes
    what `probe_reference` says (interpreted, small W, K split so the partial sums add up), and
    the int8 kernels lower for CUDA at a full-size W."""
    from benchmarks.weight_layout_probe import LAYOUTS, WORKS, _weights, probe_matvec, probe_reference

    k, n = 512, 256
    x = jax.random.normal(jax.random.key(1), (1, k)).astype(jnp.bfloat16)
    for dtype in (jnp.bfloat16, jnp.int8):
        for layout in LAYOUTS:
            w = _weights(jax.random.key(0), k, n, dtype, layout, 1)[0]
            for work in WORKS:
                if work == "dot8" and dtype != jnp.int8:
                    continue
                got = np.asarray(probe_matvec(x, w, layout=layout, work=work, splits=2, interpret=True))
                want = np.asarray(probe_reference(x, w, layout=layout, work=work))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    spec = jax.ShapeDtypeStruct
    for layout, shape in (("nk", (16384, 1024)), ("kn", (1024, 16384))):
        for work in ("dot", "dot8"):
            fn = functools.partial(probe_matvec, layout=layout, work=work)
            lowered = jax.jit(fn).trace(spec((1, 1024), jnp.bfloat16), spec(shape, jnp.int8))
            assert "triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()
