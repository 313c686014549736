"""What a training job (pretrain, finetune) asks of its process: a stop requested by a signal,
and the peak memory it used."""
from __future__ import annotations

import resource
import signal

import torch


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current optimizer step and save a checkpoint
    there; a second SIGINT interrupts at once (KeyboardInterrupt). `prog` names the job in the
    message."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.prog}: {signal.Signals(signum).name} received; stopping after this step "
              "(again to stop at once)", flush=True)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux
