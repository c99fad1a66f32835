"""channels_last against contiguous for training steps on this machine: the table behind `channels_last: auto`.

    python bench/bench_memory_format.py [--repeats 3] [--steps 3] [--device cpu]

For each (model, image size, batch) it times forward + backward + AdamW step in both memory
formats, interleaved `--repeats` times so both see the same machine load, in the precision
`precision: auto` picks here, and prints images/s and the ratio channels_last / contiguous.
"""

from __future__ import annotations

import argparse
import time

import torch

from resnet_cli.models import create_model
from resnet_cli.runtime import Runtime, resolve_precision

CASES = [("resnet18", 32, 64), ("resnet9", 32, 64), ("resnet20", 32, 128), ("resnet18", 224, 32), ("resnet50", 224, 16)]


def step_rate(name: str, size: int, batch: int, channels_last: bool, rt: Runtime, steps: int) -> float:
    """Training images/s of `steps` timed steps after one warm-up step."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name, 10, image_size=size).to(rt.device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size, device=rt.device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=rt.device)
    for i in range(steps + 1):
        if i == 1:
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    rt = Runtime(device, resolve_precision("auto", device), False)
    print(f"device {device}, precision {rt.precision}, {torch.get_num_threads()} threads")
    print("| model | px | batch | contiguous img/s | channels_last img/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, batch in CASES:
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for cl in (False, True):
                rates[cl].append(step_rate(name, size, batch, cl, rt, args.steps))
        c, n = sum(rates[False]) / args.repeats, sum(rates[True]) / args.repeats
        print(f"| {name} | {size} | {batch} | {c:.1f} | {n:.1f} | **{n / c:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
