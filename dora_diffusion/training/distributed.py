"""Several processes: the Accelerator, and keeping every process's copy of the adapter identical.

Every process holds the whole (frozen) model; after each optimizer step's micro-batches the adapter
gradients (a few MB) are averaged with one all-reduce. No DDP wrapper is needed, so parameters without a
gradient (text_encoder's last layer, whose output SDXL does not use) and accumulation need no special care.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.training.args import resolve_mixed_precision
from dora_diffusion.training.config import TrainConfig
from dora_diffusion.training.errors import ShardingNotSupported, TrainingError

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits at a barrier or collective: the main process may be writing a checkpoint or
rendering validation images meanwhile, and downloads or class images may take long (NCCL's default is 10 min)."""



def refuse_sharding(accelerator=None) -> None:
    """Refuse DeepSpeed and FSDP configs at the start, before anything is loaded: from the environment
    ``accelerate launch`` sets (call it before creating the Accelerator, which would fail first without
    deepspeed installed), then from the ``accelerator``'s own distributed type.

    This script keeps the whole frozen model on every process and all-reduces the adapter's gradients itself;
    DeepSpeed and FSDP would shard or wrap the model it never hands them. The adapter is a few MB, so plain
    data parallelism (``accelerate launch --multi_gpu``) is what scales it.
    """
    from accelerate.utils import DistributedType

    kind = None if accelerator is None else accelerator.distributed_type
    env = {k: os.environ.get(k, "").lower() for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")}
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP) or "true" in env.values():
        name = "DeepSpeed" if kind == DistributedType.DEEPSPEED or env["ACCELERATE_USE_DEEPSPEED"] == "true" else "FSDP"
        raise ShardingNotSupported(
            f"the accelerate config asks for {name}, which train_dreambooth_dora.py does not support: every process "
            "holds the whole frozen model and only the adapter's gradients (a few MB) are averaged. Launch with "
            "plain data parallelism instead: `accelerate launch --multi_gpu --num_processes N train_dreambooth_dora.py ...` "
            "(or run `accelerate config` and choose multi-GPU without DeepSpeed/FSDP)"
        )


def make_accelerator(config: TrainConfig, output_dir: Path) -> tuple[object, str]:
    """An ``accelerate.Accelerator`` for this run, and ``--mixed_precision`` resolved on its device.

    Launched as several processes on a machine without CUDA (``accelerate launch --multi_gpu
    --num_processes 2``, ``torchrun``), it asks accelerate for a gloo group on the CPU: without
    ``cpu=True`` accelerate would let every process train alone.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    cpu = launched and not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    precision = resolve_mixed_precision(config.mixed_precision, state.device.type)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision and state.num_processes == 1:
        # a second in-process run (tests, the Gradio demo) with another precision
        AcceleratorState._reset_state()
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
    )
    return accelerator, precision


def average_gradients(params: list[nn.Parameter], accelerator) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    flat = accelerator.reduce(flat, reduction="mean")
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def broadcast_parameters(params: list[nn.Parameter]) -> None:
    """Make every process start from the main process's adapter (initial or resumed)."""
    from accelerate.utils import broadcast

    with torch.no_grad():
        flat = broadcast(torch._utils._flatten_dense_tensors([p.data for p in params]), from_process=0)
        for p, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.data for p in params])):
            p.copy_(synced)


def adapters_in_sync(params: list[nn.Parameter], accelerator) -> bool:
    """True if every process holds the same adapter (compared through one checksum per process)."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = accelerator.gather(checksum)
    return bool(torch.all(gathered == gathered[0]))
