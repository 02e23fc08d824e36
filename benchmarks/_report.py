"""Shared by the benchmark scripts: a log that is printed and kept, and a wall-clock budget."""

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


def chosen(text: str, known, what: str) -> list[str]:
    """The names of a comma list argument, each one of `known`; else exit with one line."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def failure(e: BaseException, limit: int = 300) -> str:
    """An exception as one table-safe line: its type and its message with the whitespace
    collapsed, cut at `limit` characters (a variant that failed is a row, not a traceback)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def median_seconds(fn, *args, reps: int = 15) -> float:
    """Median wall-clock seconds of `fn(*args)` over `reps` runs, each waited for, after one
    untimed run (compilation)."""
    import statistics

    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)
