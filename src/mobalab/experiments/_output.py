"""An experiment's result folder: ``<name>.csv`` (tidy rows), ``<name>[-<key>].png`` (figures) and
``<name>.json`` (config, environment record and the manifest: every file of the result with its size and
SHA-256).

Writing never leaves a mixed set. Every file is first written in full under a hidden temporary name in the
same folder; only then are they renamed into place: the old JSON is removed first, the data files renamed,
the new JSON renamed last, with SIGINT and SIGTERM held back for those few renames (a Ctrl-C that arrives
then takes effect once the new result is complete). An interrupt or a write error before that leaves the
earlier result untouched and removes the temporary files. A reader that checks the manifest
(:func:`read_run`) therefore sees the old result, the new one, or (after a hard kill in the middle of the
renames) no manifest, never a mixture passed off as one result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import pandas as pd

from mobalab.bench.environment import environment, git_commit, git_modified

__all__ = ["environment", "git_commit", "git_modified", "prepare_out_dir", "result_files", "write_run", "read_run",
           "InterruptedAfterWrite"]


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) arrived while the result was being renamed into place; it was held back until the
    new result was complete, so ``paths`` hold a whole, consistent result."""

    def __init__(self, paths: dict[str, Path]):
        super().__init__("interrupted after the result was written")
        self.paths = paths


def result_files(out_dir, name: str) -> list[Path]:
    """The files of an existing result of ``name`` in ``out_dir`` (CSV, JSON, PNGs and what its manifest
    lists), sorted; empty when there is none."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = {out / f"{name}.csv", out / f"{name}.json", out / f"{name}.png", *out.glob(f"{name}-*.png")}
    found |= {out / f for f in _manifest_names(out / f"{name}.json")}
    return sorted(p for p in found if p.is_file())


def prepare_out_dir(out_dir, name: str, overwrite: bool = False) -> tuple[Path, Path | None]:
    """Check, before any work, that ``out_dir`` can hold the result of ``name``; create it if needed.

    Refuses (ValueError) a path that is an existing file, a folder that cannot be created or written, and
    a folder that already holds a result of ``name`` unless ``overwrite``. Returns the folder and the
    topmost folder this call created (None if it existed), so that a run that fails can remove it again
    (:func:`remove_if_empty`).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file, not a folder")
    created = None
    if not out.exists():
        created = next((p for p in reversed([out, *out.parents]) if not p.exists()), out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create the output folder {str(out)!r}: {exc.strerror or exc}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=f".{name}.", suffix=".probe") as f:
            f.write(b"probe")
            f.flush()
    except OSError as exc:
        remove_if_empty(out, created)
        raise ValueError(f"cannot write into the output folder {str(out)!r}: {exc.strerror or exc}") from None
    existing = result_files(out, name)
    if existing and not overwrite:
        listed = ", ".join(p.name for p in existing)
        raise ValueError(f"{str(out)!r} already holds a result of {name} ({listed}); pass --overwrite to "
                         "replace it, or choose another --out")
    return out, created


def remove_if_empty(out_dir, created: Path | None) -> None:
    """Remove the folders :func:`prepare_out_dir` created (``out_dir`` up to ``created``) while they are empty."""
    if created is None:
        return
    path, stop = Path(out_dir), Path(created)
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == stop or path.parent == path:
            return
        path = path.parent


def _manifest_names(json_path: Path) -> list[str]:
    try:
        files = json.loads(json_path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return []
    # only plain names in the same folder: a manifest never points elsewhere
    return [f for f in files if isinstance(f, str) and f == Path(f).name]


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the process's umask.

    The staged files come from :func:`tempfile.mkstemp`, which creates them 0o600 whatever the umask, and a
    rename keeps that mode; without this a result would be readable by its owner only. The umask can only be
    read by setting it, so it is set and put back at once. That is process-wide: a file another thread
    creates in that instant gets the interim 0o077 (private: never more open than the real umask makes
    it), acceptable for the command line's single writer, and kept to this one function.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return 0o666 & ~mask


def _write_file(tmp: Path, write) -> None:
    """Write one staged file completely (``write(path)``) and flush it to disk."""
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back (main thread only); a held signal is raised again on exit.

    The Python-level handlers are swapped for one that only records the signal: blocking the signal with
    ``pthread_sigmask`` would not do, since the kernel hands a process-directed signal to any thread that
    does not block it (torch's worker threads, say), and Python then raises KeyboardInterrupt in the main
    thread all the same.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, _frame):
        held.append(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if previous is not None:  # None: a handler installed outside Python, which cannot be restored
            old[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_run(out_dir, name: str, config, data: pd.DataFrame, figures: dict, extra: dict | None = None
              ) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>[-<key>].png`` and ``<name>.json`` into ``out_dir`` so that no reader
    ever sees a mixed set (module docstring).

    ``figures`` maps a short key ("" for the main figure) to a matplotlib Figure (closed afterwards);
    ``extra`` adds entries to the JSON. Returns the paths written ("csv", "json", "png" / "png:<key>").
    Raises :class:`InterruptedAfterWrite` when a held-back interrupt arrived during the final renames.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path, Path]] = []  # (key, temporary, final)
    mode = _file_mode()

    def stage(key: str, final: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        staged.append((key, Path(tmp), final))
        os.chmod(tmp, mode)
        _write_file(Path(tmp), write)

    committed = False
    try:
        stage("csv", out / f"{name}.csv", lambda p: data.to_csv(p, index=False))
        for key, fig in figures.items():
            stage(f"png:{key}" if key else "png", out / (f"{name}-{key}.png" if key else f"{name}.png"),
                  lambda p, fig=fig: fig.savefig(p, format="png", dpi=130, bbox_inches="tight"))
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        env = environment()
        if env.get("git_commit"):
            env["git_modified"] = git_modified()
        meta = {"experiment": name, "config": cfg, "environment": env, "rows": len(data),
                "columns": list(data.columns), **(extra or {}),
                "files": {final.name: _digest(tmp) for _, tmp, final in staged}}
        json_final = out / f"{name}.json"
        stage("json", json_final, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
        old_names = set(_manifest_names(json_final))
        paths = {key: final for key, _, final in staged}
        try:
            with _signals_held():
                json_final.unlink(missing_ok=True)  # from here on no manifest vouches for the old files
                for _, tmp, final in staged:  # the JSON is staged last, so it is renamed last
                    os.replace(tmp, final)
                committed = True
                _fsync_dir(out)
        except KeyboardInterrupt:
            if committed:
                raise InterruptedAfterWrite(paths) from None
            raise
        for stale in old_names - {p.name for p in paths.values()}:  # files of the old result only
            with contextlib.suppress(OSError):
                (out / stale).unlink()
        return paths
    finally:
        if not committed:
            for _, tmp, _ in staged:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        for fig in figures.values():
            plt.close(fig)


def read_run(out_dir, name: str) -> tuple[pd.DataFrame, dict]:
    """The tidy table and the JSON record of the result of experiment ``name`` in ``out_dir``, checked.

    Every file the JSON's manifest lists must be there with the recorded size and SHA-256, so a folder
    whose files come from different runs (or were edited since) is refused rather than read as one result.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        The folder ``mobalab run <name> --out DIR`` wrote.
    name : str
        The experiment's name, e.g. ``"snr-vs-accuracy"``.

    Returns
    -------
    (pandas.DataFrame, dict)
        The CSV's rows and the JSON record (``config``, ``environment``, ``files``, ...).

    Raises
    ------
    ValueError
        When the folder holds no complete result of ``name``, or a file differs from the manifest.

    Examples
    --------
    >>> import tempfile, pandas as pd
    >>> from mobalab.experiments import read_run
    >>> from mobalab.experiments._output import write_run
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_run(folder, "demo", {"seed": 0}, pd.DataFrame({"x": [1, 2]}), {})
    >>> df, meta = read_run(folder, "demo")
    >>> list(df["x"]), sorted(meta["files"])
    ([1, 2], ['demo.csv'])
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"{str(out)!r} is not a folder (expected the --out folder of `mobalab run {name}`)")
    json_path = out / f"{name}.json"
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{str(out)!r} holds no complete result of {name} (no {json_path.name})") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{json_path} cannot be read: {exc}") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or f"{name}.csv" not in files:
        raise ValueError(f"{json_path} has no manifest of the result's files (written by an older mobalab?)")
    # a manifest lists plain names in its own folder: "../x" or "/x" would vouch for files of other folders
    odd = [f for f, want in files.items() if f != Path(f).name or f in ("", ".", "..") or not isinstance(want, dict)]
    if odd:
        raise ValueError(f"{json_path} has a malformed manifest: {', '.join(map(repr, odd))} (each entry must be a "
                         "file name in the same folder with its bytes and sha256)")
    contents, bad = {}, []
    for fname, want in files.items():
        path = out / fname
        try:
            blob = path.read_bytes()
        except OSError:
            bad.append(f"{fname} (missing)")
            continue
        if len(blob) != want.get("bytes") or hashlib.sha256(blob).hexdigest() != want.get("sha256"):
            bad.append(f"{fname} (differs from the manifest)")
        contents[fname] = blob
    if bad:
        raise ValueError(f"{str(out)!r} holds no consistent result of {name}: {', '.join(bad)}")
    return pd.read_csv(io.BytesIO(contents[f"{name}.csv"])), meta
