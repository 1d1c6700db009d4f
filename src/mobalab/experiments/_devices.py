"""Where the experiments' Monte Carlo and kernel legs run: shared by every experiment with a GPU leg."""

from __future__ import annotations

__all__ = ["resolve_device", "kernel_backend"]


def resolve_device(device: str) -> str:
    """``device``, with "auto" turned into "cuda" when torch sees a GPU and "cpu" otherwise."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def kernel_backend(kernel_device: str, setting: str = "kernel_device"):
    """(torch device, backend name, device name, torch dtype) of a kernel leg.

    "auto": the CUDA kernel in fp16 when a usable GPU with CuPy is present, else the torch reference in
    fp32 on the CPU; "cpu" or a CUDA device string force one of them (ValueError naming ``setting``, the
    config field the device came from, when CUDA is asked for and cannot run, or for any other device).
    """
    import platform

    import torch

    from mobalab.kernels import gpu_available

    refused = f"{setting} must be 'auto', 'cpu' or a CUDA device, got {kernel_device!r}"
    dev = ("cuda" if gpu_available() else "cpu") if kernel_device == "auto" else kernel_device
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows, not the ones we take
        raise ValueError(refused) from None
    if device.type == "cuda":
        if not gpu_available():
            raise ValueError(f"{setting} {kernel_device!r} asks for the CUDA kernel, but no usable GPU/CuPy here")
        return device, "cuda-kernel", torch.cuda.get_device_name(device), torch.float16
    if device.type != "cpu":
        raise ValueError(refused)
    return device, "torch-reference", f"cpu ({platform.processor() or platform.machine()})", torch.float32
