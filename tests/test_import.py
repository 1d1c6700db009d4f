"""`import mobalab` and every CPU-side module must work without CuPy and without a GPU."""

import subprocess
import sys


def test_import_does_not_pull_cupy(tmp_path):
    # An importable stand-in for CuPy: on a machine without it, an `import cupy` tried under `try` would fail
    # silently and leave sys.modules clean, so the check below could never fail where CI runs.
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("")
    code = (
        "import sys, mobalab, mobalab.snr, mobalab.simulate, mobalab.kernels, mobalab.kernels.reference, "
        "mobalab.experiments, mobalab.cli; "
        "import mobalab.experiments.snr_vs_accuracy; "
        "assert 'cupy' not in sys.modules, 'cupy imported at import time'; print('ok')"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import importlib.util as u; "
        "assert u.find_spec('cupy').origin.startswith(sys.path[0]); " + code
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
