"""mobalab: predict, simulate and measure Mixture of Block Attention (MoBA) routing.

Three legs that should agree:

* :mod:`mobalab.snr` -- the analytic model (SNR, exact top-k hit probability, causal corrections,
  inverse design);
* :mod:`mobalab.simulate` -- Monte Carlo of the same model (score level) and of real vectors
  (vector level);
* :mod:`mobalab.kernels` -- MoBA attention: a readable torch reference and CUDA kernels (CuPy,
  imported lazily, so ``import mobalab`` works on machines without a GPU).

:mod:`mobalab.experiments` ties them together; ``mobalab run <experiment>`` is the CLI.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"
__all__ = ["snr", "simulate", "kernels", "experiments", "stats", "__version__"]


def __getattr__(name):  # lazy submodules keep `import mobalab` cheap
    if name in {"snr", "simulate", "kernels", "experiments", "stats"}:
        return _import_module(f"mobalab.{name}")
    raise AttributeError(f"module 'mobalab' has no attribute {name!r}")
