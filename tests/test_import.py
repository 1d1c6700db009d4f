"""`import mobalab` and every CPU-side module must work without CuPy and without a GPU."""

import subprocess
import sys


def test_import_does_not_pull_cupy():
    code = (
        "import sys, mobalab, mobalab.snr, mobalab.simulate, mobalab.kernels, mobalab.kernels.reference, "
        "mobalab.experiments, mobalab.cli; "
        "import mobalab.experiments.snr_vs_accuracy; "
        "assert 'cupy' not in sys.modules, 'cupy imported at import time'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
