"""NVML telemetry of CUDA rows: SM clock, mean power, energy per image."""
from __future__ import annotations

import contextlib
import math
import time

import torch

from energyvit.benchmark.environment import cpu_model, first_line

class Telemetry:
    """NVML readings for CUDA rows; every field is 'n/a' on CPU or without nvidia-ml-py."""

    def __init__(self, device: torch.device) -> None:
        self.handle, self.nvml, self.reason = None, None, ""
        self.device_name, self.driver = "n/a", "n/a"
        if device.type != "cuda":
            self.reason = "no GPU"
            self.device_name = f"CPU: {cpu_model()}"
            return
        self.device_name = torch.cuda.get_device_name(device)
        try:
            import pynvml  # nvidia-ml-py
        except ImportError as e:
            self.reason = f"nvidia-ml-py not installed ({first_line(e)})"
            return
        try:
            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            handle = None
            uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
            if uuid is not None:
                with contextlib.suppress(Exception):
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            if handle is None:  # fall back to the CUDA index (right when CUDA_VISIBLE_DEVICES is unset)
                handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            drv = pynvml.nvmlSystemGetDriverVersion()
            self.driver = drv.decode() if isinstance(drv, bytes) else str(drv)
            self.handle, self.nvml = handle, pynvml
        except Exception as e:  # noqa: BLE001  (NVML missing from the driver, no permission, ...)
            self.reason = f"NVML unavailable ({first_line(e)})"

    def measure(self, fn, seconds: float, images: int, sync) -> dict:
        """Run fn for about `seconds`; SM clock, mean power and energy per image over that loop."""
        out = {"energy_j_per_image": "n/a", "power_w": "n/a", "sm_clock_mhz": "n/a"}
        if self.handle is None:
            return out
        nv, h = self.nvml, self.handle
        try:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            one = max(time.perf_counter() - t, 1e-6)
            iters = max(1, int(math.ceil(seconds / one)))
            e0 = nv.nvmlDeviceGetTotalEnergyConsumption(h)  # mJ
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            t1 = time.perf_counter()
            e1 = nv.nvmlDeviceGetTotalEnergyConsumption(h)
            joules = (e1 - e0) / 1e3
            out["energy_j_per_image"] = f"{joules / (iters * images):.4g}"
            out["power_w"] = f"{joules / (t1 - t0):.1f}"
            out["sm_clock_mhz"] = str(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        except Exception as e:  # noqa: BLE001
            out["energy_j_per_image"] = f"n/a ({first_line(e)[:80]})"
        return out

