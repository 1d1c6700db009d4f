import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pandas as pd
import pytest

from mobalab import cli, experiments
from mobalab.experiments import _output, read_run

# A tiny experiment with the registry's protocol, so that the CLI's handling of folders, interrupts and
# write errors is tested in well under a second per run. `runs` counts the calls of run().
FAKE = textwrap.dedent('''
    from dataclasses import dataclass

    import pandas as pd

    NAME = "fake"
    runs = []


    @dataclass(frozen=True)
    class Config:
        rows: int = 60
        seed: int = 0

        @classmethod
        def quick(cls, **overrides):
            return cls(**{"rows": 5, **overrides})


    def plan(config):
        return f"{config.rows} rows on the CPU"


    def run(config, progress=False):
        runs.append(config)
        return pd.DataFrame({"experiment": NAME, "run_seed": config.seed, "i": range(config.rows),
                             "x": [config.seed + 0.5 * i for i in range(config.rows)]})


    def plot(df):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot(df["i"], df["x"])
        return fig


    def summary(df):
        return pd.DataFrame({"rows": [len(df)], "seed": [int(df["run_seed"].iloc[0])]})
''')
FAKE_MODULE = "mobalab_cli_test_fake_experiment"


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """Register the tiny experiment as `fake`; returns its module."""
    src = tmp_path / "fake_src"
    src.mkdir()
    (src / f"{FAKE_MODULE}.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, FAKE_MODULE, raising=False)
    monkeypatch.setitem(experiments.REGISTRY, "fake", FAKE_MODULE)
    mod = experiments.get("fake")
    yield mod
    sys.modules.pop(FAKE_MODULE, None)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# list, unknown experiment, the main job


def test_list_is_plain_text(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "snr-vs-accuracy" in out and "moba_attention" in out
    assert "`" not in out and ":func:" not in out


def test_unknown_experiment(capsys):
    assert cli.main(["run", "no-such-thing", "--quick"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_run_quick_writes_csv_json_png_from_any_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout
    out = tmp_path / "svsa"
    assert cli.main(["run", "snr-vs-accuracy", "--quick", "--out", str(out), "--seed", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "max_abs_units" in printed and "snr-vs-accuracy" in printed
    assert "vector level on cpu" in printed.splitlines()[0]  # the plan, before the run: device and trials
    assert "20000.0" not in printed and "max_half_width" in printed
    df, meta = read_run(out, "snr-vs-accuracy")
    assert {"analytic", "score-level", "vector-level"} <= set(df["method"])
    assert meta["config"]["seed"] == 5 and meta["rows"] == len(df)
    assert "torch" in meta["environment"]
    assert set(meta["files"]) == {"snr-vs-accuracy.csv", "snr-vs-accuracy.png"}
    # the CLI seed is an integer column; derived seeds and counts are integers too (empty where a leg has none)
    assert (df["run_seed"] == 5).all() and df["run_seed"].dtype.kind == "i"
    text = pd.read_csv(out / "snr-vs-accuracy.csv", dtype=str, keep_default_na=False)
    score = text[text["method"] == "score-level"].iloc[0]
    for c in ("seed", "hits", "trials", "run_seed"):
        assert score[c].isdigit(), (c, score[c])
    assert (text.loc[text["method"] == "analytic", "seed"] == "").all()
    png = (out / "snr-vs-accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


# --------------------------------------------------------------------------------------------------
# --seed: one check, one message, for every experiment


@pytest.mark.parametrize("experiment", experiments.names())
@pytest.mark.parametrize("seed", ["-1", "1.5", str(2**63)])
def test_bad_seed_is_refused_by_the_cli(experiment, seed, tmp_path, capsys):
    assert cli.main(["run", experiment, "--seed", seed, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"argument --seed: the seed must be an integer from 0 to 2**63 - 1, got '{seed}'" in err
    assert "numpy" not in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("experiment", experiments.names())
def test_experiments_check_the_seed_themselves(experiment):
    mod = experiments.get(experiment)
    with pytest.raises(ValueError, match="seed must be an integer from 0"):
        mod.run(mod.Config.quick(seed=-1))


# --------------------------------------------------------------------------------------------------
# --out: checked before any work, never silently overwritten, never lost to a write error


def test_out_that_is_a_file_fails_before_computing(fake, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert cli.main(["run", "fake", "--out", str(target)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert fake.runs == []  # nothing was computed


def test_out_that_cannot_be_created_fails_before_computing(fake, capsys):
    assert cli.main(["run", "fake", "--out", "/proc/mobalab-x"]) == 2
    err = capsys.readouterr().err
    assert "cannot create the output folder '/proc/mobalab-x'" in err and "Traceback" not in err
    assert fake.runs == []


def test_existing_result_is_refused_unless_overwrite(fake, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0
    first = _snapshot(out)
    capsys.readouterr()
    assert cli.main(["run", "fake", "--out", str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a result of fake (fake.csv, fake.json, fake.png)" in err and "--overwrite" in err
    assert len(fake.runs) == 1 and _snapshot(out) == first
    assert cli.main(["run", "fake", "--out", str(out), "--seed", "3", "--overwrite", "--no-progress"]) == 0
    df, meta = read_run(out, "fake")
    assert (df["run_seed"] == 3).all() and meta["config"]["seed"] == 3


def test_overwrite_removes_the_old_results_extra_files(fake, tmp_path):
    out = tmp_path / "r"
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0
    # an older result with a second figure: its manifest lists fake-extra.png
    meta = json.loads((out / "fake.json").read_text())
    (out / "fake-extra.png").write_bytes(b"old")
    meta["files"]["fake-extra.png"] = {"bytes": 3, "sha256": "x"}
    (out / "fake.json").write_text(json.dumps(meta))
    assert cli.main(["run", "fake", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fake.csv", "fake.json", "fake.png"]


def test_write_error_keeps_the_result_elsewhere(fake, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real = _output.write_run

    def disk_full(out_dir, *a, **k):
        if Path(out_dir) == out:
            raise OSError(28, "No space left on device")
        return real(out_dir, *a, **k)

    monkeypatch.setattr(_output, "write_run", disk_full)
    monkeypatch.setattr(cli, "_fallback_dir", lambda name: tmp_path / "elsewhere")
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"could not write to {out}" in captured.err and "elsewhere" in captured.err
    df, _ = read_run(tmp_path / "elsewhere", "fake")
    assert len(df) == 60 and str(tmp_path / "elsewhere" / "fake.csv") in captured.out


def test_interrupt_while_computing_leaves_the_folder_as_it_was(fake, tmp_path, capsys, monkeypatch):
    def interrupted(config, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "run", interrupted)
    fresh = tmp_path / "new" / "deeper"
    assert cli.main(["run", "fake", "--out", str(fresh)]) == 130
    assert "interrupted while computing" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the folders it created for the run are gone again


def test_read_run_refuses_a_mixed_folder(fake, tmp_path):
    out = tmp_path / "r"
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0
    read_run(out, "fake")
    (out / "fake.csv").write_text("experiment,run_seed,i,x\nfake,7,0,7.0\n")
    with pytest.raises(ValueError, match=r"no consistent result of fake: fake.csv \(differs"):
        read_run(out, "fake")
    (out / "fake.json").unlink()
    with pytest.raises(ValueError, match="no complete result"):
        read_run(out, "fake")


# --------------------------------------------------------------------------------------------------
# a real SIGINT at the worst moments of the write, in a subprocess

CHILD = textwrap.dedent('''
    import os, signal, sys
    # a test run started as a background job inherits SIGINT ignored, and Python then installs no handler for it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, sys.argv[3])
    from mobalab import cli, experiments
    from mobalab.experiments import _output

    experiments.REGISTRY["fake"] = "{module}"
    calls = []

    def pause_after_first(real):
        def wrapped(*args):
            real(*args)
            calls.append(args)
            if len(calls) == 1:
                print("PAUSED", flush=True)
                sys.stdin.readline()  # the parent sends SIGINT here
        return wrapped

    if sys.argv[1] == "staged":  # the new CSV is complete under its temporary name; PNG and JSON are not
        _output._write_file = pause_after_first(_output._write_file)
    else:  # "renaming": the new CSV is in place, the JSON still is not
        os.replace = pause_after_first(os.replace)
    sys.exit(cli.main(["run", "fake", "--out", sys.argv[2], "--seed", "7", "--overwrite", "--no-progress"]))
''').replace("{module}", FAKE_MODULE)


def _interrupt_child(tmp_path, out, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, str(script), mode, str(out), str(tmp_path / "fake_src")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.strip() == "PAUSED":
                break
        else:
            raise AssertionError(f"the child never paused: {proc.stderr.read()}")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate("\n", timeout=120)  # "renaming" holds SIGINT back: let it go on
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


@pytest.mark.parametrize("mode", ["staged", "renaming"])
def test_sigint_during_the_write_never_leaves_a_mixed_set(fake, tmp_path, mode, capsys):
    out = tmp_path / "kc"
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0  # the good seed-0 result
    before = _snapshot(out)
    rc, stderr = _interrupt_child(tmp_path, out, mode)
    assert rc == 130, stderr
    listing = sorted(p.name for p in out.iterdir())
    try:
        df, meta = read_run(out, "fake")  # consistent: every file matches the manifest
    except ValueError as exc:
        raise AssertionError(f"{exc}; folder: {listing}; child: {stderr}") from None
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    if mode == "staged":
        assert "interrupted while writing" in stderr
        assert _snapshot(out) == before and (df["run_seed"] == 0).all() and len(df) == 60
    else:
        assert "the new result was already complete" in stderr
        assert (df["run_seed"] == 7).all() and meta["config"]["seed"] == 7


# --------------------------------------------------------------------------------------------------
# bench: in-process, lazily imported


@pytest.fixture()
def stand_in_bench(monkeypatch):
    """A stand-in for mobalab.bench.attention (argparse without a prog, as a module's main often has)."""
    calls = []

    def main(argv=None):
        p = argparse.ArgumentParser(description="stand-in")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--out")
        calls.append(p.parse_args(argv))
        return 0

    mod = types.ModuleType("mobalab.bench.attention")
    mod.main = main
    monkeypatch.setitem(sys.modules, "mobalab.bench.attention", mod)
    return calls


def test_bench_without_gpu_says_what_it_needs(capsys, monkeypatch, stand_in_bench):
    import mobalab.kernels as K

    monkeypatch.setattr(K, "gpu_available", lambda: False)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs an NVIDIA GPU" in err and "mobalab run kernel-speed" in err and "recorded" in err
    assert stand_in_bench == []


def test_bench_runs_the_attention_benchmark_in_process(capsys, monkeypatch, stand_in_bench):
    import mobalab.kernels as K

    monkeypatch.setattr(K, "gpu_available", lambda: True)
    monkeypatch.setattr(subprocess, "run", None)  # no shelling out
    assert cli.main(["bench", "--quick", "--out", "somewhere"]) == 0
    assert stand_in_bench[0].quick and stand_in_bench[0].out == "somewhere"
    assert cli.main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mobalab bench")
    assert cli.main(["bench", "--no-such-flag"]) == 2
    assert "usage: mobalab bench" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# kernel-speed from any folder


def test_kernel_speed_from_any_folder_reads_the_recorded_csv_and_says_so(tmp_path, capsys, monkeypatch):
    import mobalab.kernels as K
    from mobalab.experiments import kernel_speed

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(kernel_speed.ENV_VAR, raising=False)
    monkeypatch.setattr(K, "gpu_available", lambda: False)
    assert cli.main(["run", "kernel-speed", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "reads the recorded benchmark 2026-11-22-h200-moba-forward-43ade7f.csv" in lines[0]
    assert lines[1].startswith("RECORDED forward benchmark, not measured on this machine: NVIDIA H200, "
                               "2026-11-22 00:02 UTC, commit 43ade7f")
    df, meta = read_run(tmp_path / "runs" / "kernel-speed", "kernel-speed")
    assert df["recorded"].all()
    # found at run time, so the record names the CSV: elsewhere the search could find another
    assert meta["command"].endswith("--seed 0 --bench-csv " + df["source"].iloc[0])


def test_kernel_speed_bench_csv_flag(tmp_path, capsys):
    out = tmp_path / "bwd"
    assert cli.main(["run", "kernel-speed", "--bench-csv", "2026-11-22-h200-moba-fwdbwd-sweep.csv", "--out",
                     str(out), "--no-progress"]) == 0
    assert "RECORDED forward+backward benchmark" in capsys.readouterr().out
    df, meta = read_run(out, "kernel-speed")
    assert set(df["pass"]) == {"forward+backward"} and meta["config"]["bench_csv"].endswith("fwdbwd-sweep.csv")
    assert cli.main(["run", "kernel-speed", "--bench-csv", str(tmp_path / "nope.csv")]) == 2
    assert "argument --bench-csv" in capsys.readouterr().err
    assert cli.main(["run", "key-conv", "--bench-csv", "recorded", "--out", str(tmp_path / "kc")]) == 2
    assert "--bench-csv applies to decode-cost and kernel-speed only, not to key-conv" in capsys.readouterr().err
    assert not (tmp_path / "kc").exists()


def test_bench_csv_recorded_means_each_experiments_own_recorded_benchmark(tmp_path, capsys):
    from mobalab.experiments import decode_cost

    out = tmp_path / "dc"
    assert cli.main(["run", "decode-cost", "--quick", "--bench-csv", "recorded", "--out", str(out),
                     "--no-progress"]) == 0
    assert f"recorded decode benchmark {decode_cost.RECORDED_BENCH}" in capsys.readouterr().out.splitlines()[0]
    df, meta = read_run(out, "decode-cost")
    assert meta["config"]["bench_csv"].endswith(decode_cost.RECORDED_BENCH)
    assert df["measured_ms"].notna().any()  # the recorded step times reached the table
    # a recorded decode CSV by name; the forward CSV is refused by decode-cost before any work
    assert cli.main(["run", "decode-cost", "--quick", "--bench-csv", "2026-12-01-h200-decode-7e51062.csv",
                     "--out", str(tmp_path / "by-name"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "decode-cost", "--quick", "--bench-csv", "2026-11-22-h200-moba-forward-43ade7f.csv",
                     "--out", str(tmp_path / "fwd")]) == 2
    assert "lacks the columns" in capsys.readouterr().err and not (tmp_path / "fwd").exists()
    assert cli.main(["run", "decode-cost", "--quick", "--bench-csv", "nope.csv", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "argument --bench-csv: decode benchmark CSV 'nope.csv' does not exist" in err
    assert decode_cost.RECORDED_BENCH in err and "moba-forward" not in err  # lists the decode CSVs only


def test_bench_csv_experiments_are_those_whose_config_takes_one():
    import dataclasses

    takes = sorted(n for n in experiments.names()
                   if "bench_csv" in {f.name for f in dataclasses.fields(experiments.get(n).Config)})
    assert list(cli._BENCH_CSV_EXPERIMENTS) == takes
    assert all(hasattr(experiments.get(n), "find_bench_csv") for n in takes)


def test_run_help_says_bench_csv_serves_both_experiments(capsys):
    assert cli.main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "kernel-speed: a `mobalab bench` CSV" in text and "decode-cost: a `mobalab bench --decode` CSV" in text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_result_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    """0o666 less the umask, as open() would create them, not the 0o600 of the temporary files they start as."""
    old = os.umask(umask)
    try:
        paths = _output.write_run(tmp_path, "demo", {"seed": 0}, pd.DataFrame({"x": [1]}), {})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == want, (p.name, oct(p.stat().st_mode))


def test_bench_says_when_the_benchmark_cannot_be_imported(capsys, monkeypatch):
    import mobalab.kernels as K

    monkeypatch.setattr(K, "gpu_available", lambda: True)
    monkeypatch.setitem(sys.modules, "mobalab.bench.attention", None)  # import fails
    assert cli.main(["bench", "--quick"]) == 2
    assert "the attention benchmark cannot be imported here" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# stdout closed early (`mobalab list | head -1`): a quiet exit, no traceback


def _with_stdout_closed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m mobalab.cli ARGS`` with stdout a pipe whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "mobalab.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              cwd=cwd, timeout=300, text=True)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [
    ["list"],
    ["design", "--head-dim", "128", "--seq-len", "32768", "--top-k", "8", "--target", "0.5", "--delta-mu", "0.5",
     "--m", "4", "--block-sizes", "64,128"],
    ["run", "decode-cost", "--quick", "--out", "bp", "--no-progress"],
], ids=["list", "design", "run"])
def test_a_closed_stdout_ends_quietly_with_the_sigpipe_status(args, tmp_path):
    done = _with_stdout_closed(args, tmp_path)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert not (tmp_path / "bp").exists()  # a run that cannot say what it does stops before any work


class _ClosesAfterFirstLine:
    """A stdout whose reader goes away after the first line, as `| head -1` does."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        if "\n" in self.text:
            raise BrokenPipeError(32, "Broken pipe")
        self.text += text
        return len(text)

    def flush(self):
        pass


def test_a_reader_that_leaves_after_the_first_line_keeps_the_finished_result(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosesAfterFirstLine())
    assert cli.main(["run", "fake", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 141
    assert sys.stdout.text.startswith("fake (quick): 5 rows on the CPU")
    df, _ = read_run(tmp_path / "o", "fake")  # written before the summary that found the pipe closed
    assert len(df) == 5


def test_the_record_says_how_to_rerun_the_result(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(_output, "git_modified", lambda: True)
    out = tmp_path / "r"
    assert cli.main(["run", "fake", "--out", str(out), "--quick", "--seed", "5", "--no-progress"]) == 0
    _, meta = read_run(out, "fake")
    assert meta["command"] == "mobalab run fake --quick --seed 5"
    if meta["environment"]["git_commit"]:  # a commit is only a citation when the tree held no edits
        assert meta["environment"]["git_modified"] is True


@pytest.mark.parametrize("entry", ["../elsewhere.csv", "/etc/hostname"])
def test_read_run_refuses_a_manifest_that_points_outside_its_folder(fake, tmp_path, entry):
    out = tmp_path / "r"
    assert cli.main(["run", "fake", "--out", str(out), "--no-progress"]) == 0
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("x\n")
    meta = json.loads((out / "fake.json").read_text())
    meta["files"][entry] = {"bytes": 2, "sha256": _output._digest(outside)["sha256"]}
    (out / "fake.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="malformed manifest"):
        read_run(out, "fake")


def test_read_run_of_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=r"is not a folder \(expected the --out folder of `mobalab run rope`\)"):
        read_run(tmp_path / "missing", "rope")
