"""GPU kernel profiles from CUPTI, through JAX's profiler (private `jax._src` calls: kept out of
the library). `jaxtts bench --kernels` and the probes in this package use them."""

from __future__ import annotations

_DERIVED_LINES = (
    "XLA Modules",
    "XLA Ops",
    "XLA TraceMe",
    "Steps",
    "Launch Stats",
    "Source code",
    "TensorFlow Ops",
    "TensorFlow Name Scope",
    "Framework Ops",
    "Framework Name Scope",
)


def gpu_kernel_events(run) -> list[tuple[int, int, str]]:
    """Calls `run()` under jax's profiler (CUPTI) and returns its GPU kernels as sorted
    (start_ns, duration_ns, name) tuples. Raises if the profiler cannot start (no CUPTI)."""
    from jax._src.lib import _profiler
    from jax._src.profiler import ProfileData

    opts = _profiler.ProfileOptions()
    opts.python_tracer_level = 0
    opts.host_tracer_level = 0
    opts.raise_error_on_start_failure = True
    session = _profiler.ProfilerSession(opts)
    run()
    pd = ProfileData.from_serialized_xspace(session.stop())
    events = set()
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name in _DERIVED_LINES:
                continue
            for e in line.events:
                events.add((int(e.start_ns), int(e.duration_ns), e.name))
    return sorted(events)


def kernel_us_per_call(fn, *args, calls: int) -> dict:
    """{kernel name: GPU µs per call} of one profiled run of `fn(*args)`, a jitted chain of
    `calls` calls, sorted by time (after one unprofiled run, so compilation is not in it)."""
    import jax

    jax.block_until_ready(fn(*args))
    per = {}
    for _, dur, kname in gpu_kernel_events(lambda: jax.block_until_ready(fn(*args))):
        per[kname] = per.get(kname, 0.0) + dur / 1e3 / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def kernel_profile(model, sampler, *, chunk: int, prompt_tokens: int, opts=None, top: int = 30, batch: int = 1) -> dict:
    """GPU kernels of one warm decode chunk of `batch` rows compiled with `opts` (a
    `jaxtts.DecodeOptions`; default: `default_options()`): count, busy time (sum of durations)
    and span (first start to last end) per frame, and the kernels that cost the most per frame."""
    import jax

    from jaxtts.generation import decode_chunk
    from jaxtts.options import resolve_options
    from jaxtts.testing import prompt_state

    opts = resolve_options(opts)
    cache_len = min(model.cfg.backbone.max_seq_len, prompt_tokens + 4 * chunk)
    state = prompt_state(model, batch, prompt_tokens, cache_len, opts)
    for _ in range(2):
        state, frames, _ = decode_chunk(model, state, sampler, chunk, opts=opts)
        jax.block_until_ready(frames)
    # One traced chunk (its state is donated, so it runs exactly once).
    events = gpu_kernel_events(lambda: jax.block_until_ready(decode_chunk(model, state, sampler, chunk, opts=opts)[1]))
    if not events:
        return {"kernels_error": "no GPU kernel events in the trace"}
    busy = sum(d for _, d, _ in events)
    span = max(t + d for t, d, _ in events) - events[0][0]
    per_name: dict[str, list] = {}
    for _, d, name in events:
        c = per_name.setdefault(name, [0, 0])
        c[0] += 1
        c[1] += d
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "kernels_per_frame": len(events) / chunk,
        "kernel_busy_ms_per_frame": busy / chunk * 1e-6,
        "kernel_span_ms_per_frame": span / chunk * 1e-6,
        "kernel_top": {name: {"per_frame": c / chunk, "us_per_frame": d / chunk * 1e-3} for name, (c, d) in ranked},
    }
