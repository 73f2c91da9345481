"""Where the tensors of a worker live and in which precision: device, autocast, batch transfer.

Owns ``device_for`` (Ray Train's device on GPU workers, else the CPU), ``autocast_for``
(``train.amp``: auto = bf16 on CUDA when supported) and ``to_device`` (a numpy batch -> tensors).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


def device_for(use_gpu: bool) -> torch.device:
    """The worker's device: Ray Train's (one GPU per worker) when ``use_gpu``, else the CPU."""
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def autocast_for(device: torch.device, amp: str) -> Any:
    """The autocast context for ``train.amp`` (auto | off | bf16 | fp16) on ``device``."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def grad_scaler_for(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """The loss scaler ``train.amp: fp16`` needs (float16 gradients underflow without it), or
    None: bf16 and float32 keep float32's exponent range and need none."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A numpy batch as tensors on ``device`` (same keys, same dtypes)."""
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}
