r"""The scaling targets of context parallelism from benchmark folders: ``python -m mobalab.distributed.summary``.

Reads ``cp_bench.csv`` and ``cp_bench_env.json`` of runs of :mod:`mobalab.distributed.bench` (``--runs``: the
multi-GPU runs; ``--single``: the one-GPU runs of the same configuration, the ring code in one process and/or
``--path single-device``, whose fastest run at the longest length is the baseline) and prints one markdown
row per (layout, length, GPU count):

* time: forward + backward of the slowest rank (the ranks wait for each other);
* per-GPU useful TFLOP/s: the useful FLOPs of all ranks over (GPUs x slowest time), and its ratio to the
  one-GPU rate at the longest length the one-GPU run did forward + backward (target >= 0.8 at that length);
* peak memory: the largest rank's, against what one GPU would need for the whole sequence, extrapolated
  linearly from the one-GPU run's peak per token at its longest forward + backward length (target <= 0.55
  at the longest length);
* the communication model's time (docs/design.md, "Context parallelism") against the measured one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

__all__ = []


def _rows(folder: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(folder, "cp_bench_env.json")) as f:
        env = json.load(f)
    with open(os.path.join(folder, "cp_bench.csv")) as f:
        rows = list(csv.DictReader(f))
    return env, rows


def _num(x):
    return float(x) if x not in (None, "") else None


def _per_length(env: dict, rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({int(r["seq_len"]) for r in rows}):
        ranks = [r for r in rows if int(r["seq_len"]) == n]
        mode = ranks[0]["mode"]
        item = dict(layout=env["layout"], seq_len=n, gpus=len(ranks), mode=mode, note=ranks[0].get("note", ""))
        if mode != "fwd+bwd":
            out.append(item)
            continue
        slowest = max(_num(r["fwdbwd_ms"]) for r in ranks)
        flops = sum(_num(r["useful_tflop"]) for r in ranks)
        models = [_num(r.get("model_ms")) for r in ranks if _num(r.get("model_ms")) is not None]
        peaks = [_num(r.get("peak_gb")) for r in ranks if _num(r.get("peak_gb")) is not None]  # none on CPUs
        item.update(ms=slowest, tflops_per_gpu=flops / (len(ranks) * slowest / 1e3),
                    peak_gb=max(peaks) if peaks else None, model_ms=max(models) if models else None,
                    routing_ms=max(_num(r["routing_ms"]) for r in ranks))
        out.append(item)
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _baseline(singles: list[str]) -> dict | None:
    """The one-GPU baseline from one or more one-GPU runs (e.g. the ring code in one process and the
    single-device path): the longest length any of them did forward + backward, the fastest run there; the
    memory per token is the least any of them needed at its own longest forward + backward."""
    done = []
    for folder in singles:
        if os.path.exists(os.path.join(folder, "cp_bench.csv")):
            env, rows = _rows(folder)
            runs = [r for r in _per_length(env, rows) if r["mode"] == "fwd+bwd"]
            if runs:
                done.append((env.get("path", "cp"), runs))
    if not done:
        return None
    longest = max(runs[-1]["seq_len"] for _, runs in done)
    path, base = max(((p, r) for p, runs in done for r in runs if r["seq_len"] == longest),
                     key=lambda pr: pr[1]["tflops_per_gpu"])
    base = dict(base, path=path)
    per_token = [runs[-1]["peak_gb"] / runs[-1]["seq_len"] for _, runs in done if runs[-1]["peak_gb"]]
    base["gb_per_token"] = min(per_token) if per_token else None
    return base


def summarize(runs: list[str], single: str | list[str] | None) -> str:
    """The markdown table and the target lines."""
    singles = [single] if isinstance(single, str) else list(single or [])
    base = _baseline(singles)
    lines = []
    if base:
        per_token = "-" if base["gb_per_token"] is None else f"{1e6 * base['gb_per_token']:.1f}"
        lines.append(f"One-GPU baseline: N {base['seq_len']}, {base['ms']:.1f} ms, {base['tflops_per_gpu']:.1f} "
                     f"useful TFLOP/s ({base['path']} path), peak {_fmt(base['peak_gb'])} GB; one GPU needs "
                     f"{per_token} KB/token (the least of the one-GPU runs)")
    else:
        lines.append("One-GPU baseline: none (no forward + backward in the one-GPU run)")
    lines += ["", "| layout | N | GPUs | mode | fwd+bwd ms (slowest rank) | routing ms | useful TFLOP/s per GPU | "
              "x one-GPU rate | peak GB per GPU | one GPU would need GB | peak / one GPU | model ms | "
              "measured / model | note |", "|" + "---|" * 14]
    verdicts = []
    items = [r for folder in runs if os.path.exists(os.path.join(folder, "cp_bench.csv"))
             for r in _per_length(*_rows(folder))]
    for r in items:
        rate = mem = need = None
        if base and r["mode"] == "fwd+bwd":
            rate = r["tflops_per_gpu"] / base["tflops_per_gpu"]
            if base["gb_per_token"] and r["peak_gb"]:
                need = base["gb_per_token"] * r["seq_len"]
                mem = r["peak_gb"] / need
            if r["seq_len"] == base["seq_len"] and r["gpus"] > 1:
                verdicts.append(f"{r['layout']} N {r['seq_len']}: per-GPU rate {rate:.2f} x one GPU (target >= 0.80)"
                                f": {'met' if rate >= 0.8 else 'not met'}")
        measured_model = r["ms"] / r["model_ms"] if r.get("model_ms") else None
        lines.append(f"| {r['layout']} | {r['seq_len']} | {r['gpus']} | {r['mode']} | {_fmt(r.get('ms'))} | "
                     f"{_fmt(r.get('routing_ms'))} | {_fmt(r.get('tflops_per_gpu'))} | {_fmt(rate, '.2f')} | "
                     f"{_fmt(r.get('peak_gb'))} | {_fmt(need)} | {_fmt(mem, '.2f')} | {_fmt(r.get('model_ms'), '.0f')} "
                     f"| {_fmt(measured_model, '.2f')} | {r['note']} |")
    missing = [folder for folder in [*runs, *singles] if not os.path.exists(os.path.join(folder, "cp_bench.csv"))]
    if missing:  # a run cut short before its first length, or a mistyped folder: say so, not a silent gap
        verdicts.append(f"No cp_bench.csv, left out: {', '.join(missing)}")
    multi = [r for r in items if r["gpus"] > 1]
    if multi and base and base["gb_per_token"]:
        longest = max(r["seq_len"] for r in multi)
        for r in multi:
            if r["seq_len"] == longest:
                ok = r["mode"] == "fwd+bwd" and bool(r.get("peak_gb")) and \
                    r["peak_gb"] / (base["gb_per_token"] * longest) <= 0.55
                verdicts.append(f"{r['layout']} N {longest}: {r['mode']}, peak per GPU "
                                f"{_fmt(r.get('peak_gb'))} GB of {base['gb_per_token'] * longest:.1f} one-GPU GB "
                                f"(target fwd+bwd and <= 0.55): {'met' if ok else 'not met'}")
    return "\n".join(lines + [""] + verdicts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobalab.distributed.summary", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="bench output folders of the multi-GPU runs")
    p.add_argument("--single", nargs="+", default=None,
                   help="bench output folders of the one-GPU runs (the fastest at the longest length is the baseline)")
    args = p.parse_args(argv)
    print(summarize(args.runs, args.single), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
