"""Small helpers around ``cuda.bindings.driver`` results (imported lazily by the fused modules)."""

from __future__ import annotations

from typing import Any

from eep.errors import EEPError


class CudaDriverError(EEPError, RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error string."""


def check(result: Any, what: str) -> Any:
    """Unpack a ``cuda.bindings`` result tuple ``(err, *values)``, raising on a non-success code."""
    from cuda.bindings import driver

    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != int(driver.CUresult.CUDA_SUCCESS):
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        raise CudaDriverError(f"{what} failed: {_decode(name)} ({_decode(text)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def ensure_context(device_ordinal: int) -> Any:
    """Make the device's primary context (the one torch uses) current on this thread."""
    from cuda.bindings import driver

    check(driver.cuInit(0), "cuInit")
    ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    dev = check(driver.cuDeviceGet(device_ordinal), "cuDeviceGet")
    if ctx is None or int(ctx) == 0:
        ctx = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return ctx


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
