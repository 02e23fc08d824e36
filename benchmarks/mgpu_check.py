"""GPU check of the Mosaic GPU matvec (pallas_kernels.matvec_mgpu) on a Hopper GPU (H100 / H200):
correctness at every CSM-1B decode shape, and timings against the Triton matvec and XLA.

    python -m benchmarks.mgpu_check [--budget-s 150] [--reps 200] [--sweep] [--out FILE]
    python -m benchmarks.mgpu_check --int8 [--sweep] [--out FILE]

Needs an sm_90 GPU (the kernel uses wgmma, which Blackwell does not have) and JAX >= 0.11 for PDL
(0.10.x emits the griddepcontrol instructions but launches without programmatic stream
serialization, so they do nothing there).

1. Correctness, bf16, M = 1 and 8, default config, at each of CSM-1B's nine projection shapes;
   then a few non-default configs (one split: the kernel writes bf16 itself; block_n 256; 2
   stages; block_k 128), float32 x, leading dims, and a chain of two kernels where the second
   reads the first's output (PDL: the second is launched early and must wait). Each against
   `matvec_reference`: ok = all finite and relative L2 error <= 1e-2 (bf16) / 1e-5 (f32 x).
2. Timings, bf16, M = 1 and 8, per call (µs, median ±IQR/2 of --reps timed runs after two
   warm-up runs, each run one jitted program + block_until_ready): XLA's `jnp.dot(x, w,
   preferred_element_type=f32).astype(bf16)`, the Triton `matvec` (default config), `matvec_mgpu`
   (default config, with the partial-sum op), and the Mosaic kernel alone (`partials=True`: no
   sum op, so consecutive calls are back-to-back Mosaic kernels) with and without PDL. Each
   program calls the variant once for each of several separate copies of W (>= 192 MB in all,
   4..48 copies) so that W streams from HBM as in the model rather than from the 50 MB L2; the
   time per call is the program's time / copies (the host's dispatch of the program is included
   once per program, spread over the copies, and so are the launch gaps between kernels, which
   the host sets: docs/KERNELS.md found wall-clock per call about twice the kernel time for XLA
   and Triton alike). TB/s = W bytes / time. A second table gives the same programs' GPU time
   from a CUPTI trace (benchmarks.profile, as in benchmarks.matvec_check): kernel busy time and
   span per call; PDL shows in the span of "mgpu kernel" vs "mgpu kernel no-PDL".
3. --sweep: the Mosaic kernel alone at other block_n / block_k / stages, per shape and M, until
   the budget is spent.

--int8 (instead of 1-3): int8 weights with one float32 scale per column (`jaxtts.quantize`;
`matvec_mgpu(x, q, w_scale)`: int8 tiles by TMA, converted to bf16 in the kernel, scales in the
epilogue). 1. Correctness against `matvec_reference(x, q, scale)` at the nine shapes, M = 1 and 8,
default int8 config, then a few other configs, float32 x, leading dims and a PDL chain of two int8
kernels (same ok rule as above). 2. Time per call (as above, wall clock and CUPTI) of XLA's convert +
dot on the int8 weight, the Triton GEMV with bf16 and with int8 W (`matvec(x, q, scale)`), and the
Mosaic GEMV with bf16 and with int8 W (and the int8 kernel alone, `partials=True`); TB/s of each from
its own weight bytes (int8 + scales: K·N + 4N; bf16: 2·K·N). Every program streams >= 192 MB of int8
weights (4..96 copies; the bf16 variants read twice that). 3. --sweep: the int8 kernel alone at other
block_n / block_k / stages.

Robustness: the work runs in a child process that reports each case as it finishes. A config
that fails to lower or compile prints its error line and the run goes on; if the child dies (a
Mosaic GPU runtime error aborts the process) or a case makes no progress for --case-timeout-s
(a kernel hung on a barrier), the case is reported as crashed or hung and a new child carries on
with the rest. New cases stop starting after --budget-s seconds (default 150,
so the whole run stays under 3 minutes) and the tables are printed with what was measured.

Exit status: 0 if every correctness case passed, 1 if any mismatched, failed or crashed, 2 if
there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback

MARK = "@@mgpu "  # child -> parent protocol lines: MARK + json
# Smoke test of this script on a CPU (kernels interpreted, small shapes, few reps): MGPU_CHECK_SMOKE=1.
# MGPU_CHECK_CRASH=<case id> makes the child abort in that case, MGPU_CHECK_HANG=<case id> hang in it
# (tests the restart paths).
SMOKE = os.environ.get("MGPU_CHECK_SMOKE") == "1"

# name -> (K, N): CSM-1B's decode projections.
SHAPES = {
    "depth qkv": (1024, 1536),
    "depth out": (1024, 1024),
    "depth gate_up": (1024, 16384),
    "depth down": (8192, 1024),
    "projection": (2048, 1024),
    "backbone qkv": (2048, 3072),
    "backbone out": (2048, 2048),
    "backbone gate_up": (2048, 16384),
    "backbone down": (8192, 2048),
}

SMOKE_EXTRAS = [
    dict(kind="check", name="small a", k=256, n=256, m=1, dtype="bfloat16", kw=dict(k_splits=1)),
    dict(kind="check", name="small a", k=256, n=256, m=2, dtype="float32", kw={}),
    dict(kind="check", name="small a", k=256, n=256, m=8, dtype="bfloat16", kw=dict(lead=(2, 4))),
]
SMOKE_EXTRAS_INT8 = [
    dict(kind="check", int8=True, name="small a", k=256, n=256, m=1, dtype="bfloat16", kw=dict(k_splits=1)),
    dict(kind="check", int8=True, name="small a", k=256, n=256, m=2, dtype="float32", kw={}),
    dict(kind="check", int8=True, name="small a", k=256, n=192, m=3, dtype="bfloat16", kw=dict(block_n=192)),
]
if SMOKE:
    SHAPES = {"small a": (256, 256), "small b": (512, 128)}

SWEEP = [  # (block_n, block_k, stages); k_splits: the default for the blocks
    (64, 64, 4),
    (64, 128, 4),
    (128, 64, 2),
    (128, 64, 6),
    (128, 128, 3),
    (256, 64, 3),
    (256, 64, 4),
    (64, 64, 8),
    # one program per SM, more bytes in flight (session 11)
    (128, 128, 4),
    (64, 256, 4),
    (256, 128, 2),
]
SWEEP_INT8 = [  # (block_n, block_k, stages) for int8 W: longer K blocks or deeper rings carry bf16's bytes
    (64, 64, 4),
    (64, 64, 8),
    (64, 128, 4),
    (128, 64, 4),
    (128, 64, 6),
    (128, 128, 2),
    (128, 128, 3),
    (256, 64, 4),
]


# Further correctness cases beyond the default config at every shape (configs the defaults do not
# reach: one split, wide blocks, shallow rings, float32 x, leading dims), for both weight formats.
SHARED_EXTRAS = [
    dict(kind="check", name="backbone qkv", k=2048, n=3072, m=1, dtype="bfloat16", kw=dict(k_splits=1)),
    dict(kind="check", name="backbone gate_up", k=2048, n=16384, m=1, dtype="bfloat16", kw=dict(block_n=256)),
    dict(kind="check", name="backbone down", k=8192, n=2048, m=8, dtype="bfloat16", kw=dict(stages=2)),
    dict(kind="check", name="depth gate_up", k=1024, n=16384, m=3, dtype="bfloat16", kw=dict(block_k=128)),
    dict(kind="check", name="backbone out", k=2048, n=2048, m=1, dtype="float32", kw={}),
    dict(kind="check", name="depth qkv", k=1024, n=1536, m=8, dtype="float32", kw={}),
    dict(kind="check", name="backbone qkv", k=2048, n=3072, m=8, dtype="bfloat16", kw=dict(lead=(2, 4))),
]
EXTRAS = SHARED_EXTRAS + [
    dict(kind="check", name="depth down", k=8192, n=1024, m=8, dtype="bfloat16", kw=dict(k_splits=1)),
]
EXTRAS_INT8 = SHARED_EXTRAS + [
    dict(kind="check", name="backbone qkv", k=2048, n=3072, m=8, dtype="bfloat16", kw=dict(block_n=192)),
    dict(kind="check", name="depth down", k=8192, n=1024, m=1, dtype="bfloat16", kw=dict(stages=1)),
]


def case_list(sweep: bool, int8: bool = False) -> list[dict]:
    """Every case of a run, in a fixed order (the parent skips and reports them by index): checks
    of the default config at each shape and 1 / 8 rows, the extra checks, the PDL chains, the
    timings, and with `sweep` the config sweep. int8: the same with int8 weights."""
    tag = dict(int8=True) if int8 else {}
    rows = (1, 8)
    cases = [
        dict(kind="check", **tag, name=name, k=k, n=n, m=m, dtype="bfloat16", kw={})
        for name, (k, n) in SHAPES.items()
        for m in rows
    ]
    if SMOKE:
        extras = SMOKE_EXTRAS_INT8 if int8 else SMOKE_EXTRAS
    else:
        extras = EXTRAS_INT8 if int8 else EXTRAS
    cases += [dict(c, **tag) for c in extras]
    chain = "out -> qkv, PDL pair" + (", int8" if int8 else "")
    cases += [dict(kind="chain", **tag, name=chain, m=m) for m in rows]
    cases += [dict(kind="time", **tag, name=name, k=k, n=n, m=m) for name, (k, n) in SHAPES.items() for m in rows]
    if sweep:
        cases += [
            dict(kind="sweep", **tag, name=name, k=k, n=n, m=m, cfg=[bn, bk, st])
            for name, (k, n) in SHAPES.items()
            for m in rows
            for bn, bk, st in (SWEEP_INT8 if int8 else SWEEP)
        ]
    return cases


# --------------------------------------------------------------------------- child: does the work


def _emit(**payload):
    print(MARK + json.dumps(payload), flush=True)


def _err_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def child(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtts.quantize import quantize_array
    from pallas_kernels.matvec import matvec, matvec_reference
    from pallas_kernels.matvec_mgpu import default_config, matvec_mgpu

    dev = jax.devices()[0]
    _emit(
        kind="device",
        platform=dev.platform,
        device=getattr(dev, "device_kind", str(dev)),
        cc=str(getattr(dev, "compute_capability", "?")),
        jax=jax.__version__,
    )
    if dev.platform != "gpu" and not SMOKE:
        return
    crash = int(os.environ.get("MGPU_CHECK_CRASH", "-1"))

    skip = set(json.loads(args.skip))
    deadline = args.deadline
    rng = np.random.default_rng(0)

    def operands(m, k, n, dtype, copies=1):
        xs, ws = [], []
        for _ in range(copies):
            xs.append(jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype))
            ws.append(jnp.asarray(rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k), jnp.bfloat16))
        return xs, ws

    def compare(out, want, dtype):
        out = np.asarray(out.astype(jnp.float32)).reshape(want.shape)
        want = np.asarray(want.astype(jnp.float32))
        finite = bool(np.isfinite(out).all())
        err = float(np.max(np.abs(out - want))) if finite else float("nan")
        rel = float(np.linalg.norm(out - want) / np.linalg.norm(want)) if finite else float("nan")
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        return dict(err=err, rel=rel, ok=bool(finite and rel <= tol))

    def kn_int8(w):
        """(q [K, N], scale): the layout `matvec_mgpu` reads (`quantize_array` gives [N, K])."""
        q, scale = quantize_array(w)
        return jnp.swapaxes(q, -1, -2), scale

    def weight(w, int8):
        """(w,) for bf16 W, or (q, scale) of w for int8 W: the weight arguments of both kernels."""
        return kn_int8(w) if int8 else (w,)

    def run_check(c):
        dtype = jnp.dtype(c["dtype"])
        kw = dict(c["kw"])
        lead = tuple(kw.pop("lead", ()))
        int8 = c.get("int8", False)
        (x,), (w,) = operands(c["m"], c["k"], c["n"], dtype)
        wa = weight(w, int8)
        xin = x.reshape(*lead, c["k"]) if lead else x  # prod(lead) == m
        out = matvec_mgpu(xin, *wa, interpret=SMOKE, **kw)
        cfg = default_config(x.shape[0] * (3 if dtype == jnp.float32 else 1), c["k"], c["n"], int8=int8)
        res = compare(out, matvec_reference(x, *wa), dtype)
        res["config"] = {**cfg._asdict(), **kw}
        return res

    def run_chain(c):
        m = c["m"]
        int8 = c.get("int8", False)
        k1, k2 = (256, 128) if SMOKE else (2048, 3072)
        (x,), (w1,) = operands(m, k1, k1, jnp.bfloat16)
        w2 = operands(m, k1, k2, jnp.bfloat16)[1][0]
        w1, w2 = weight(w1, int8), weight(w2, int8)

        @jax.jit
        def chain(x):  # back-to-back Mosaic kernels: one split, so no sum op in between
            h = matvec_mgpu(x, *w1, k_splits=1, interpret=SMOKE)
            return matvec_mgpu(h, *w2, k_splits=1, interpret=SMOKE), h

        out, h = chain(x)
        r1 = compare(h, matvec_reference(x, *w1), jnp.bfloat16)
        r2 = compare(out, matvec_reference(h, *w2), jnp.bfloat16)
        return dict(
            err=max(r1["err"], r2["err"]),
            rel=max(r1["rel"], r2["rel"]),
            ok=r1["ok"] and r2["ok"],
            config=dict(k_splits=1),
        )

    def timed(fns, xs, ws, reps, profile=False):
        """name -> (median, IQR/2) wall seconds per call, or an error line; variants interleaved.
        With `profile`, also name -> GPU kernel busy and span per call from a CUPTI trace."""
        progs, res = {}, {}
        for name, fn in fns.items():
            prog = jax.jit(lambda xs, ws, fn=fn: [fn(x, w) for x, w in zip(xs, ws)])
            try:
                jax.block_until_ready(prog(xs, ws))
                jax.block_until_ready(prog(xs, ws))
                progs[name] = prog
            except Exception as e:  # report and time the others
                res[name] = _err_line(e)
                traceback.print_exc(limit=3)
        samples = {name: [] for name in progs}
        for _ in range(reps):
            for name, prog in progs.items():
                t = time.perf_counter()
                jax.block_until_ready(prog(xs, ws))
                samples[name].append((time.perf_counter() - t) / len(ws))
        for name, v in samples.items():
            q1, q2, q3 = np.percentile(v, [25, 50, 75])
            res[name] = [float(q2), float(q3 - q1) / 2]
        if not profile or SMOKE or not progs:
            return res, {}
        try:
            from benchmarks.matvec_check import _device

            dev = _device(progs, xs, ws, reps=20) or {}
            return res, {name: dict(busy=list(d["busy"]), span=list(d["span"])) for name, d in dev.items()}
        except Exception as e:  # no CUPTI: wall-clock only
            print(f"(profile failed: {_err_line(e)})", flush=True)
            return res, {}

    def copies(k, n, int8=False):
        if SMOKE:
            return 2
        return int(min(96, max(4, -(-192e6 // (k * n))))) if int8 else int(min(48, max(4, -(-192e6 // (2 * k * n)))))

    def run_time_int8(c):
        k, n, m = c["k"], c["n"], c["m"]
        xs, ws = operands(m, k, n, jnp.bfloat16, copies(k, n, int8=True))
        # (bf16 W, q [K, N], scale, q [N, K]): the same weight every way
        ws = [(w, *kn_int8(w), quantize_array(w)[0]) for w in ws]
        fns = {
            "xla int8": lambda x, w: (
                jnp.dot(x, w[1].astype(x.dtype), preferred_element_type=jnp.float32) * w[2]
            ).astype(x.dtype),
            "triton bf16": lambda x, w: matvec(x, w[0], interpret=SMOKE),
            "triton int8": lambda x, w: matvec(x, w[3], w[2], w_transposed=True, interpret=SMOKE),
            "mgpu bf16": lambda x, w: matvec_mgpu(x, w[0], interpret=SMOKE),
            "mgpu int8": lambda x, w: matvec_mgpu(x, w[1], w[2], interpret=SMOKE),
            "mgpu int8 kernel": lambda x, w: matvec_mgpu(x, w[1], w[2], partials=True, interpret=SMOKE),
        }
        res, dev = timed(fns, xs, ws, args.reps, profile=True)
        return dict(times=res, gpu=dev, copies=len(ws), config=default_config(m, k, n, int8=True)._asdict())

    def run_time(c):
        if c.get("int8"):
            return run_time_int8(c)
        k, n, m = c["k"], c["n"], c["m"]
        xs, ws = operands(m, k, n, jnp.bfloat16, copies(k, n))
        fns = {
            "xla": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
            "triton": lambda x, w: matvec(x, w, interpret=SMOKE),
            "mgpu": lambda x, w: matvec_mgpu(x, w, interpret=SMOKE),
            "mgpu kernel": lambda x, w: matvec_mgpu(x, w, partials=True, interpret=SMOKE),
            "mgpu kernel no-PDL": lambda x, w: matvec_mgpu(x, w, partials=True, pdl=False, interpret=SMOKE),
        }
        res, dev = timed(fns, xs, ws, args.reps, profile=True)
        return dict(times=res, gpu=dev, copies=len(ws), config=default_config(m, k, n)._asdict())

    def run_sweep(c):
        k, n, m = c["k"], c["n"], c["m"]
        bn, bk, st = c["cfg"]
        if n % bn or k % bk:
            return dict(times={"mgpu kernel": "shape not a multiple of the blocks"})
        int8 = c.get("int8", False)
        xs, ws = operands(m, k, n, jnp.bfloat16, copies(k, n, int8))
        ws = [weight(w, int8) for w in ws]
        fn = lambda x, w: matvec_mgpu(x, *w, block_n=bn, block_k=bk, stages=st, partials=True, interpret=SMOKE)
        times, dev = timed({"mgpu kernel": fn}, xs, ws, max(50, args.reps // 4), profile=True)
        return dict(times=times, gpu=dev)

    runners = dict(check=run_check, chain=run_chain, time=run_time, sweep=run_sweep)
    for cid, c in enumerate(case_list(args.sweep, args.int8)):
        if cid in skip:
            continue
        if time.time() > deadline:
            _emit(kind="result", id=cid, skipped=True)
            continue
        _emit(kind="start", id=cid)
        if cid == crash:
            os.abort()
        if cid == int(os.environ.get("MGPU_CHECK_HANG", "-1")):
            time.sleep(3600)
        t = time.perf_counter()
        try:
            res = runners[c["kind"]](c)
        except Exception as e:  # one broken config must not hide the others
            res = dict(ok=False, error=_err_line(e))
            traceback.print_exc(limit=4)
        _emit(kind="result", id=cid, seconds=time.perf_counter() - t, **res)


# --------------------------------------------------------------------------- parent: supervise, print


def _us(v):
    return f"{v[0] * 1e6:.1f} ±{v[1] * 1e6:.1f}" if isinstance(v, list) else "ERROR"


def _cfg(cfg: dict | None) -> str:
    if not cfg:
        return ""
    short = dict(block_n="bn", block_k="bk", k_splits="s", stages="st", lead="lead")
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    ap.add_argument("--reps", type=int, default=200, help="timed runs per variant (after 2 warm-up runs)")
    ap.add_argument("--sweep", action="store_true", help="also time other configs of the Mosaic kernel")
    ap.add_argument("--int8", action="store_true", help="int8 weights (correctness and timings) instead of bf16")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--case-timeout-s", type=float, default=60.0, help="kill a case making no progress this long")
    ap.add_argument("--kinds", default=None, help="only these case kinds (comma list of check, chain, time, sweep)")
    ap.add_argument("--shapes", default=None, help="only these shapes (comma list of SHAPES names, e.g. 'depth down')")
    ap.add_argument("--rows", default=None, help="only these row counts M (comma list)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    start = time.time()
    deadline = start + args.budget_s
    cases = case_list(args.sweep, args.int8)
    results: dict[int, dict] = {}
    wanted = {
        "kind": args.kinds and set(args.kinds.split(",")),
        "name": args.shapes and set(args.shapes.split(",")),
        "m": args.rows and {int(r) for r in args.rows.split(",")},
    }
    filtered = {  # left out by the filters: neither run nor reported
        cid for cid, c in enumerate(cases) if any(keep and c.get(field) not in keep for field, keep in wanted.items())
    }
    results.update({cid: dict(kind="result", id=cid, skipped=True) for cid in filtered})
    device: dict = {}
    lines: list[str] = []

    def log(line=""):
        print(line, flush=True)
        lines.append(line)

    while True:
        done = sorted(results)
        cmd = (
            [
                sys.executable,
                "-m",
                "benchmarks.mgpu_check",
                "--child",
                "--skip",
                json.dumps(done),
                "--deadline",
                str(deadline),
                "--reps",
                str(args.reps),
            ]
            + (["--sweep"] if args.sweep else [])
            + (["--int8"] if args.int8 else [])
        )
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        lines_q: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines_q.put(x) for x in proc.stdout] + [lines_q.put(None)], daemon=True
        ).start()
        current, last, hung = None, time.time(), False
        while True:
            try:
                raw = lines_q.get(timeout=5)
            except queue.Empty:
                if current is not None and time.time() - last > args.case_timeout_s:
                    hung = True  # a kernel that never finishes (a barrier never completing) hangs the child
                    proc.kill()
                    break
                continue
            if raw is None:
                break
            if not raw.startswith(MARK):
                sys.stdout.write("    | " + raw)  # the child's own output (tracebacks, warnings)
                continue
            msg = json.loads(raw[len(MARK) :])
            last = time.time()
            if msg["kind"] == "device":
                device = msg
                log(
                    f"device: {msg['device']} (platform {msg['platform']}, compute capability {msg['cc']}); "
                    f"JAX {msg['jax']}"
                )
            elif msg["kind"] == "start":
                current = msg["id"]
                c = cases[current]
                print(f"  [{time.time() - start:5.1f} s] {c['kind']} {c['name']} M={c['m']} ...", flush=True)
            elif msg["kind"] == "result":
                results[msg["id"]] = msg
                current = None
        rc = proc.wait()
        if device and device.get("platform") != "gpu" and not SMOKE:
            log("no GPU: this check runs on an NVIDIA Hopper GPU (see the docstring)")
            return 2
        if rc == 0 or current is None:
            if rc != 0:
                log(f"child exited with status {rc} outside any case")
            break
        what = f"HUNG: no progress for {args.case_timeout_s:.0f} s, killed" if hung else f"CRASHED: status {rc}"
        results[current] = dict(kind="result", id=current, ok=False, error=what)
        log(f"case {current}: {what}; restarting for the remaining cases")

    # ---- report
    log()
    log(
        "## Correctness (matvec_mgpu, int8 W with column scales, vs matvec_reference(x, q, scale))"
        if args.int8
        else "## Correctness (matvec_mgpu vs matvec_reference)"
    )
    log("| kind | shape | M | K×N | x dtype | config | max abs err | rel L2 err | ok | s |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for cid, c in enumerate(cases):
        if c["kind"] not in ("check", "chain") or cid in filtered:
            continue
        r = results.get(cid, {})
        kn = f"{c['k']}×{c['n']}" if "k" in c else "2048×2048 → 2048×3072"
        if r.get("skipped") or not r:
            log(
                f"| {c['kind']} | {c['name']} | {c['m']} | {kn} | {c.get('dtype', 'bfloat16')} | | skipped (time budget) | | | |"
            )
            continue
        if "error" in r:
            failures += 1
            log(
                f"| {c['kind']} | {c['name']} | {c['m']} | {kn} | {c.get('dtype', 'bfloat16')} | {_cfg(c.get('kw'))} "
                f"| {r['error']} | | NO | |"
            )
            continue
        failures += not r["ok"]
        log(
            f"| {c['kind']} | {c['name']} | {c['m']} | {kn} | {c.get('dtype', 'bfloat16')} | {_cfg(r.get('config'))} "
            f"| {r['err']:.2e} | {r['rel']:.2e} | {'yes' if r['ok'] else 'NO'} | {r.get('seconds', 0):.1f} |"
        )

    variants = ["xla", "triton", "mgpu", "mgpu kernel", "mgpu kernel no-PDL"]
    if args.int8:
        variants = ["xla int8", "triton bf16", "triton int8", "mgpu bf16", "mgpu int8", "mgpu int8 kernel"]
        log()
        log(
            f"## int8 W: time per call, µs (median ±IQR/2 of {args.reps} runs; W streamed from HBM), and W TB/s "
            "(each at its own bytes: int8 + scales, or bf16)"
        )
        log(
            "| shape | K×N | M | copies | " + " | ".join(variants) + " | mgpu int8 / mgpu bf16 time | mgpu int8 vs "
            "triton int8 | mgpu int8 TB/s | mgpu bf16 TB/s | triton int8 TB/s | mgpu int8 config |"
        )
        log("|---|---|---|---|" + "---|" * len(variants) + "---|---|---|---|---|---|")
    else:
        log()
        log(f"## bf16 time per call, µs (median ±IQR/2 of {args.reps} runs; W streamed from HBM), and W TB/s")
        log(
            "| shape | K×N | M | copies | " + " | ".join(variants) + " | mgpu vs triton | mgpu vs xla | mgpu TB/s "
            "| mgpu config |"
        )
        log("|---|---|---|---|" + "---|" * len(variants) + "---|---|---|---|")
    errors = []
    for cid, c in enumerate(cases):
        if c["kind"] != "time" or cid in filtered:
            continue
        r = results.get(cid, {})
        head = f"| {c['name']} | {c['k']}×{c['n']} | {c['m']} |"
        if not r or r.get("skipped"):
            log(f"{head} | skipped (time budget) |")
            continue
        if "error" in r:
            log(f"{head} | {r['error']} |")
            continue
        t = r["times"]
        for v in variants:
            if isinstance(t.get(v), str):
                errors.append(f"- {c['name']} M={c['m']} {v}: {t[v]}")
        cells = " | ".join(_us(t.get(v)) for v in variants)
        ok = lambda v: isinstance(t.get(v), list)
        if args.int8:
            b8, b16 = c["k"] * c["n"] + 4 * c["n"], 2 * c["k"] * c["n"]
            ratio = f"{t['mgpu int8'][0] / t['mgpu bf16'][0]:.2f}" if ok("mgpu int8") and ok("mgpu bf16") else ""
            vs_tr = f"{t['triton int8'][0] / t['mgpu int8'][0]:.2f}x" if ok("triton int8") and ok("mgpu int8") else ""
            tbs = [
                f"{b / t[v][0] / 1e12:.2f}" if ok(v) else ""
                for v, b in (("mgpu int8", b8), ("mgpu bf16", b16), ("triton int8", b8))
            ]
            log(f"{head} {r['copies']} | {cells} | {ratio} | {vs_tr} | {' | '.join(tbs)} | {_cfg(r.get('config'))} |")
            continue
        vs_tr = f"{t['triton'][0] / t['mgpu'][0]:.2f}x" if ok("triton") and ok("mgpu") else ""
        vs_xla = f"{t['xla'][0] / t['mgpu'][0]:.2f}x" if ok("xla") and ok("mgpu") else ""
        tbs = f"{2 * c['k'] * c['n'] / t['mgpu'][0] / 1e12:.2f}" if ok("mgpu") else ""
        log(f"{head} {r['copies']} | {cells} | {vs_tr} | {vs_xla} | {tbs} | {_cfg(r.get('config'))} |")
    if any(results.get(cid, {}).get("gpu") for cid, c in enumerate(cases) if c["kind"] == "time"):
        log()
        log(
            "## Same programs, GPU time per call from a CUPTI trace (20 programs each): kernel busy "
            "(sum of durations) / span (first start to last end), µs. Launch gaps are in the span only; "
            "with PDL a kernel starts early and waits, so its busy time includes the wait: compare spans."
        )
        log("| shape | M | " + " | ".join(variants) + " |")
        log("|---|---|" + "---|" * len(variants))
        for cid, c in enumerate(cases):
            g = results.get(cid, {}).get("gpu") if c["kind"] == "time" else None
            if g:
                cells = " | ".join(
                    f"{g[v]['busy'][0] * 1e6:.1f} / {g[v]['span'][0] * 1e6:.1f}" if v in g else "" for v in variants
                )
                log(f"| {c['name']} | {c['m']} | {cells} |")
    if errors:
        log()
        log("Timing errors:")
        for e in errors:
            log(e)

    if args.sweep:
        log()
        log(f"## Sweep: the Mosaic kernel alone ({'int8 W, ' if args.int8 else ''}partials=True, PDL), µs per call")
        log("| shape | M | block_n | block_k | stages | µs (wall) | TB/s (wall) | GPU busy / span µs (CUPTI) |")
        log("|---|---|---|---|---|---|---|---|")
        for cid, c in enumerate(cases):
            if c["kind"] != "sweep" or cid in filtered:
                continue
            r = results.get(cid, {})
            bn, bk, st = c["cfg"]
            v = (r.get("times") or {}).get("mgpu kernel")
            if not r or r.get("skipped"):
                cell = "skipped"
            elif "error" in r:
                cell = r["error"]
            elif isinstance(v, list):
                w_bytes = c["k"] * c["n"] + 4 * c["n"] if args.int8 else 2 * c["k"] * c["n"]
                g = (r.get("gpu") or {}).get("mgpu kernel")
                gpu = f"{g['busy'][0] * 1e6:.1f} / {g['span'][0] * 1e6:.1f}" if g else "–"
                cell = f"{_us(v)} | {w_bytes / v[0] / 1e12:.2f} | {gpu}"
            else:
                cell = str(v)
            log(f"| {c['name']} | {c['m']} | {bn} | {bk} | {st} | {cell} |")

    checked = sum(1 for cid, c in enumerate(cases) if c["kind"] in ("check", "chain") and cid not in filtered)
    ran = sum(
        1
        for cid, c in enumerate(cases)
        if c["kind"] in ("check", "chain")
        and cid not in filtered
        and results.get(cid)
        and not results[cid].get("skipped")
    )
    log()
    log(
        f"{ran - failures} of {checked} correctness cases passed ({checked - ran} skipped); "
        f"{time.time() - start:.0f} s in all"
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
