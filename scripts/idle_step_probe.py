"""Does a long MoBA step take longer from an idle GPU, and is the GPU's clock why?

    python scripts/idle_step_probe.py [--seq-len 524288] [--rounds 4] [--out DIR]

One forward + backward step (batch 2, 16 heads, d 128, B 128, k 8, causal, random bf16: the benchmark's
configuration), timed by CUDA events in five ways per round, interleaved:

* ``idle``: from an idle GPU, as the benchmark times it;
* ``ahead``: behind a 30 ms sleep kernel, so that the host has issued the whole step before the GPU starts it;
* ``cooled``: after a 30 ms sleep kernel that has ended (the GPU busy, then idle; the host not ahead);
* ``idle_wait``: after 30 ms of an idle GPU (the host sleeping);
* ``cooled_300``: as ``cooled`` after a 300 ms sleep kernel.

If ``ahead`` alone is faster, the host's launches are what the step waits for; if the sleeps help too, something of
the GPU's state (its clock, its power budget) is. ``nvidia-smi`` samples the SM clock and the power every 20 ms
meanwhile; per mode the script prints the step's median and the clock and power while its steps ran, and writes the
same to ``idle_step_probe.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import threading
import time

MODES = (("idle", 0), ("ahead", 30), ("cooled", 30), ("idle_wait", 30), ("cooled_300", 300))


def clock_stats(samples: list[tuple[float, str]], windows: list[tuple[str, float, float]]) -> dict:
    """{mode: (median SM clock MHz, min, max, median power W, samples)} of the ``nvidia-smi`` lines
    ("timestamp, clock, power, ...") sampled at host times inside that mode's step windows (mode, start, end)."""
    parsed = []  # (host time, clock, power) of the lines that carry numbers
    for t, line in samples:
        parts = [x.strip() for x in line.split(",")]
        try:
            parsed.append((t, float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            continue
    out = {}
    for mode in dict.fromkeys(m for m, _, _ in windows):
        inside = [(c, p) for t, c, p in parsed
                  if any(m == mode and start <= t <= end for m, start, end in windows)]
        if inside:
            clock, power = [c for c, _ in inside], [p for _, p in inside]
            out[mode] = (statistics.median(clock), min(clock), max(clock), statistics.median(power), len(clock))
    return out


def table(seq_len: int, times: dict[str, list[float]], clocks: dict) -> str:
    lines = [f"step at N = {seq_len}, median ms over rounds (each round's value), SM clock and power while it ran", "",
             "| start | step ms | rounds | SM clock MHz: median (min-max) | power W | samples |",
             "|---|---|---|---|---|---|"]
    for mode, ms in times.items():
        c = clocks.get(mode)
        clock = f"{c[0]:.0f} ({c[1]:.0f}-{c[2]:.0f})" if c else "-"
        lines.append(f"| {mode} | {statistics.median(ms):.2f} | {', '.join(f'{x:.2f}' for x in ms)} | {clock} | "
                     f"{f'{c[3]:.0f}' if c else '-'} | {c[4] if c else 0} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=524288)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default="idle_step_probe")
    args = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from profile_host import _step_fn

    step = _step_fn(args.seq_len, 2, 16, 128, 128, 8)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    cycles_per_ms = 10_000_000 / a.elapsed_time(b)

    samples: list[tuple[float, str]] = []
    done = threading.Event()

    def sample():
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw",
                                 "--format=csv,noheader,nounits", "-lms", "20"], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            samples.append((time.time(), line.strip()))
            if done.is_set():
                break
        proc.terminate()

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(1.0)

    def timed(mode: str, sleep_ms: int) -> tuple[float, float, float]:
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if mode == "idle_wait":
            time.sleep(sleep_ms / 1e3)
        elif sleep_ms:  # ahead: the step queued behind the sleep; cooled: issued after it has ended
            torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
            if mode.startswith("cooled"):
                torch.cuda.synchronize()
        e0.record()
        step()
        e1.record()
        e1.synchronize()
        end = time.time()
        ms = e0.elapsed_time(e1)
        return ms, end - ms / 1e3, end

    times: dict[str, list[float]] = {m: [] for m, _ in MODES}
    windows = []
    for _ in range(args.rounds):
        for mode, sleep_ms in MODES:
            ms, start, end = timed(mode, sleep_ms)
            times[mode].append(ms)
            windows.append((mode, start, end))
    done.set()
    time.sleep(0.1)
    text = table(args.seq_len, times, clock_stats(samples, windows))
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "idle_step_probe.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
