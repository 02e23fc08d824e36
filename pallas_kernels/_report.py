"""Shared by the GPU check scripts: a log that is printed and kept, and a wall-clock budget."""

from __future__ import annotations

import time

START = time.perf_counter()
LINES: list[str] = []


def elapsed() -> float:
    return time.perf_counter() - START


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def write_log(path: str) -> None:
    with open(path, "w") as f:
        f.write("\n".join(LINES) + "\n")


class Budget:
    """Seconds since the script started: later, optional parts are skipped once it is spent."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def left(self) -> bool:
        return elapsed() < self.seconds


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Launch Stats", "Source code",
                  "TensorFlow Ops", "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope")


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
