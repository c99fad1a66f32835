"""Where and how a run executes: device, precision, memory format, seeds, processes."""

from __future__ import annotations

import logging
import os
import random
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from resnet_cli.errors import UserError

log = logging.getLogger(__name__)

_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass
class Runtime:
    """The resolved execution settings of one process."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    why: dict = field(default_factory=dict)  # setting -> the reason an `auto` resolved as it did

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this run spans several processes (torchrun)."""
        return self.world_size > 1

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format for the model and its image batches."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager:
        """Autocast context for the forward pass (a no-op in fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def describe(self) -> str:
        """One line saying what was chosen, printed at start-up."""
        where = f"rank {self.rank}/{self.world_size} " if self.distributed else ""
        fmt = "channels_last" if self.channels_last else "contiguous"
        why = lambda key: f" ({self.why[key]})" if self.why.get(key) else ""  # noqa: E731
        threads = f"; {self.why['threads']}" if self.why.get("threads") else ""
        return (f"{where}device {self.device} ({_device_name(self.device)}{threads}), "
                f"precision {self.precision}{why('precision')}, memory format {fmt}{why('channels_last')}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"


# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA) below which its bf16 kernels fall back to slow emulation.
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX) that oneDNN may use.

    An ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 (set to pin kernels, or to emulate an older CPU)
    turns them off: bf16 would then run emulated, several times slower than fp32.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_NO_BF16:
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_grad_hazard(model: torch.nn.Module, image_size: int, device: torch.device) -> str | None:
    """The first strided conv that sees 1-pixel maps at `image_size` (its name), or None.

    oneDNN's bf16 weight gradient of such a conv (a 3x3 stride-2 conv on a 1x1 map: the last stage
    of an ImageNet-stem net at 16 px) intermittently comes out NaN on CPUs with AVX-512 BF16,
    while fp32 is exact (measured: 2-4 of 30 tries). Found by one eval-mode forward of a blank image.
    """
    found: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: found.append(name)
                                         if min(args[0].shape[-2:]) == 1 and max(m.stride) > 1 else None)
             for name, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1]
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3  # the images' channels (1 for MNIST)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found[0] if found else None


def resolve_device(name: str, local_rank: int = 0, key: str = "trainer.device") -> torch.device:
    """Turn a device setting (auto|cpu|cuda|cuda:N|mps) into a torch.device; `key` names it in errors.

    The one resolver for resnet-train (trainer.device, `cuda` meaning this rank's GPU) and the
    tools (--device): a nonsense name or a GPU that is not there is one line naming `key`.
    """
    text = str(name).strip().lower()
    sep = "=" if "." in key else " "
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise UserError(f"{key}{sep}{name} is not a device (use auto, cpu, cuda or cuda:N)")
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{key}{sep}{name} but no CUDA device is visible; use {key}{sep}cpu or auto")
        index = int(text.split(":")[1]) if ":" in text else local_rank
        if index >= count:
            raise UserError(f"{key}{sep}{name}: {count} CUDA device(s) visible; use {key}{sep}cpu or cuda:0")
        return torch.device("cuda", index)
    return torch.device(text)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn trainer.precision (auto|fp32|bf16|fp16) into what this device runs."""
    precision = getattr(precision, "value", precision)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise UserError("trainer.precision=fp16 is for CUDA; on the CPU use bf16 or fp32")
    return precision


def resolve_channels_last(value: str, device: torch.device, precision: str) -> bool:
    """Turn trainer.channels_last (auto|true|false) into a decision."""
    value = str(value).lower()
    if value == "auto":
        if device.type == "cuda":
            return torch.cuda.get_device_capability(device)[0] >= 7  # tensor cores want NHWC
        # oneDNN's convolutions run fastest in NHWC on the CPU, in fp32 as in bf16 (measured:
        # docs/PERFORMANCE.md; bench/bench_engine.py prints the ratio on the machine at hand).
        return device.type == "cpu"
    if value not in _BOOL:
        raise UserError(f"trainer.channels_last={value} is not one of auto, true, false")
    return _BOOL[value]


def resolve_threads(value: int | str, workers: int) -> tuple[int, str]:
    """Set torch's intra-op threads from trainer.num_threads (auto|N); returns (threads, reason).

    auto keeps an explicit OMP_NUM_THREADS, else takes the usable cores minus the DataLoader
    workers, so compute threads and workers never oversubscribe the cores.
    """
    from resnet_cli.data.policy import usable_cores  # pure Python: no data-layer import

    if str(value).lower() != "auto":
        threads, why = int(value), "set"
        if threads < 1:
            raise UserError(f"trainer.num_threads={value} must be >= 1 or auto")
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), "auto: OMP_NUM_THREADS"
    else:
        cores = usable_cores()
        threads = max(1, cores - workers)
        why = f"auto: {cores} cores" + (f" - {workers} loader workers" if workers else "")
    torch.set_num_threads(threads)
    return threads, why


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def setup(trainer_cfg) -> Runtime:
    """Resolve device/precision/memory format, join the process group under torchrun, seed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(trainer_cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    precision = resolve_precision(trainer_cfg.precision, device)
    channels_last = resolve_channels_last(trainer_cfg.channels_last, device, precision)
    seed_everything(int(trainer_cfg.seed), bool(trainer_cfg.deterministic))
    why = {}
    if str(getattr(trainer_cfg.precision, "value", trainer_cfg.precision)) == "auto":
        why["precision"] = (f"auto: {'bf16' if precision == 'bf16' else 'no bf16'} on this GPU" if device.type == "cuda"
                            else f"auto: {'native' if precision == 'bf16' else 'no native'} bf16 on this CPU")
    if str(trainer_cfg.channels_last).lower() == "auto":
        why["channels_last"] = ("auto: NHWC for tensor cores" if device.type == "cuda" and channels_last
                                else "auto: oneDNN runs NHWC fastest" if channels_last else "auto")
    return Runtime(device, precision, channels_last, rank, local_rank, world_size, why)


def teardown(rt: Runtime) -> None:
    """Leave the process group, if any."""
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
