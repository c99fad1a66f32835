"""channels_last against contiguous (or bf16 against fp32) for training steps: the tables behind the `auto`s.

    python bench/bench_memory_format.py [--compare memory_format|precision] [--repeats 3] [--steps 3] [--device cpu]

For each (model, image size, batch) it times forward + backward + AdamW step both ways,
interleaved `--repeats` times so both see the same machine load, and prints images/s and
the ratio. `memory_format` (the default): contiguous against channels_last, in the precision
`precision: auto` picks here. `precision`: fp32 against bf16 autocast, both channels_last
(on a CPU without AVX-512 BF16 or AMX, bf16 is emulated and slower: why auto picks fp32 there).
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
    ap.add_argument("--compare", choices=("memory_format", "precision"), default="memory_format")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    auto = resolve_precision("auto", device)
    if args.compare == "precision":  # (label, runtime, channels_last) of the two sides
        sides = [("fp32", Runtime(device, "fp32", True), True), ("bf16", Runtime(device, "bf16", True), True)]
    else:
        sides = [("contiguous", Runtime(device, auto, False), False),
                 ("channels_last", Runtime(device, auto, True), True)]
    print(f"device {device}, precision auto = {auto}, {torch.get_num_threads()} threads")
    print(f"| model | px | batch | {sides[0][0]} img/s | {sides[1][0]} img/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, batch in CASES:
        rates: list[list[float]] = [[], []]
        for _ in range(args.repeats):
            for i, (_, rt, cl) in enumerate(sides):
                rates[i].append(step_rate(name, size, batch, cl, rt, args.steps))
        a, b = (sum(r) / args.repeats for r in rates)
        print(f"| {name} | {size} | {batch} | {a:.1f} | {b:.1f} | **{b / a:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
