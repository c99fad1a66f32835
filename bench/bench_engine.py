"""Benchmarks for the training engine; prints ratios (not a test).

    .venv/bin/python bench/bench_engine.py                 # all sections
    .venv/bin/python bench/bench_engine.py --only step     # step | precision | memory
    .venv/bin/python bench/bench_engine.py --no-resnet50   # skip the slow 224 px row

step:      the runner's training step (engine.train_steps with the parts resnet_cli.build makes)
           against a bare hand-written PyTorch loop: same model init, batch, precision, the same
           in-memory batches; repeats interleaved, medians of images/s.
precision: trainer.precision/channels_last = auto against fp32 + contiguous (and explicit bf16 +
           channels_last), resnet18 at 32 px and resnet50 at 224 px.
memory:    peak resident memory (ru_maxrss) of `resnet-train` against a bare loop script with the
           same model, batch and data, each in its own subprocess.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _batches(n: int, batch: int, size: int, classes: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(n)]


@functools.lru_cache(maxsize=1)
def _config(epochs: int):
    """The composed resnet-train config for SGD + one-cycle stepped per batch (as a user runs it)."""
    from hydra import compose, initialize_config_dir

    import resnet_cli.config  # noqa: F401  (registers the schemas, as the entry point does)
    from resnet_cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["optimizer=sgd", "scheduler=onecycle", f"trainer.epochs={epochs}"])


def _runner_loop(model, rt, steps: int):
    """Parts and settings exactly as resnet-train builds them (resnet_cli.build): SGD + OneCycle per step."""
    from resnet_cli import build

    cfg = _config(1000)
    return (build.build_parts(cfg, rt, model, model, steps_per_epoch=steps), build.build_settings(cfg, rt))


def _time_runner(loop, batches) -> float:
    from resnet_cli import engine

    parts, settings = loop
    t = time.perf_counter()
    for i, step in enumerate(engine.train_steps(parts, settings, batches, epoch=0), start=1):
        if i % 20 == 0:  # what the Trainer adds: a sync only at logged steps (trainer.log_every_n_steps)
            float(step.loss)
    _sync(settings.rt.device)
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - t)


def _bare_state(model, rt, steps: int):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps * 1000)
    return model, opt, sched


def _time_bare(state, rt, batches) -> float:
    """A hand-written loop: forward under autocast, backward, step; no bookkeeping at all."""
    import torch

    model, opt, sched = state
    model.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.precision)
    t = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        x = x.to(rt.device, memory_format=rt.memory_format)
        with torch.autocast(rt.device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (i + 1) % 20 == 0:
            float(loss)
    _sync(rt.device)
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - t)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(name: str, size: int, rt):
    from resnet_cli.models import create_model

    return create_model(name, num_classes=10, image_size=size).to(rt.device, memory_format=rt.memory_format)


def _runtime(precision: str, channels_last: str):
    import torch

    from resnet_cli import runtime

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prec = runtime.resolve_precision(precision, device)
    return runtime.Runtime(device, prec, runtime.resolve_channels_last(channels_last, device, prec))


def bench_step(args) -> None:
    """Runner step vs bare loop, interleaved; medians."""
    import torch

    torch.manual_seed(0)
    rt = _runtime("auto", "auto")
    base = _model(args.model, args.size, rt)
    batches = _batches(args.steps, args.batch, args.size, 10, rt.device)
    loop = _runner_loop(copy.deepcopy(base), rt, args.steps)
    bare = _bare_state(copy.deepcopy(base), rt, args.steps)
    _time_runner(loop, batches[:3]), _time_bare(bare, rt, batches[:3])  # warm-up (allocator, oneDNN kernels)
    runner, plain = [], []
    for _ in range(args.repeats):
        runner.append(_time_runner(loop, batches))
        plain.append(_time_bare(bare, rt, batches))
    r, b = statistics.median(runner), statistics.median(plain)
    print(f"step  {args.model} {args.size}px batch {args.batch} {rt.precision} "
          f"{'channels_last' if rt.channels_last else 'contiguous'}: runner {r:.1f} img/s, bare loop {b:.1f} img/s, "
          f"ratio {r / b:.3f} (target >= 0.95; medians of {args.repeats} interleaved repeats)")


def bench_precision(args) -> None:
    """precision=auto vs fp32 contiguous (and explicit bf16 + channels_last), interleaved medians."""
    import torch

    rows = [("resnet18", 32, 64, args.steps)]
    if not args.no_resnet50:
        rows.append(("resnet50", 224, 8, max(3, args.steps // 5)))
    from resnet_cli.runtime import cpu_supports_bf16

    settings = {"auto": ("auto", "auto"), "fp32": ("fp32", "false")}
    if torch.cuda.is_available() or cpu_supports_bf16():
        settings["bf16+cl"] = ("bf16", "true")
    else:
        # Without native bf16 the CPU emulates it (measured ~16x slower than fp32 here): auto picks fp32.
        print("precision  bf16+channels_last not timed: this CPU has no native bf16 (AVX-512 BF16/AMX)")
    for name, size, batch, steps in rows:
        torch.manual_seed(0)
        loops, speeds = {}, {k: [] for k in settings}
        base = None
        for key, (prec, cl) in settings.items():
            rt = _runtime(prec, cl)
            if base is None:  # one initialisation for every setting
                base = _model(name, size, _runtime("fp32", "false"))
            model = copy.deepcopy(base).to(memory_format=rt.memory_format)
            loops[key] = (_runner_loop(model, rt, steps), _batches(steps, batch, size, 10, rt.device))
            _time_runner(loops[key][0], loops[key][1][:2])  # warm-up
        for _ in range(args.repeats):
            for key, (loop, batches) in loops.items():
                speeds[key].append(_time_runner(loop, batches))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        chose = loops["auto"][0][1].rt
        print(f"precision  {name} {size}px batch {batch}: auto chose {chose.precision}/"
              f"{'channels_last' if chose.channels_last else 'contiguous'}; "
              + ", ".join(f"{k} {v:.1f} img/s" for k, v in med.items())
              + f"; auto/fp32 = {med['auto'] / med['fp32']:.2f}x (target >= 2.3 where bf16 is native)"
              + (f", bf16+cl/fp32 = {med['bf16+cl'] / med['fp32']:.2f}x" if "bf16+cl" in med else ""))


_BARE_SCRIPT = """
import resource, sys, torch
from resnet_cli.data.synthetic import generate_shapes
from resnet_cli.models import create_model
n, size, batch, steps, model_name = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
data = generate_shapes(n, size, 1)
model = create_model(model_name, num_classes=10, image_size=size)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
for i in range(steps):
    x = data.images[i * batch:(i + 1) * batch].float().div_(255)
    y = data.labels[i * batch:(i + 1) * batch]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kib(cmd: list[str], cwd: Path) -> int:
    """Peak resident memory of one child process (KiB, from ru_maxrss), run to completion."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
               "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True, check=True)
    rc, kib = out.stdout.split()[-2:]
    if rc != "0":
        raise SystemExit(f"{cmd[0]} failed: {out.stderr}")
    return int(kib)


def bench_memory(args) -> None:
    """Peak RSS: resnet-train vs the bare loop, same model, batch, data, precision (fp32)."""
    import tempfile

    n, steps = args.batch * args.steps, args.steps
    with tempfile.TemporaryDirectory() as tmp:
        runner_cmd = [str(Path(sys.executable).parent / "resnet-train"), f"model={args.model}", "dataset=shapes",
                      f"dataset.num_train={n}", "dataset.num_val=64", f"dataset.image_size={args.size}",
                      f"dataset.batch_size={args.batch}", "dataset.augment=none", "scheduler=none",
                      "trainer.epochs=1", "trainer.device=cpu", "trainer.precision=fp32", "trainer.channels_last=false",
                      "trainer.progress=false", "trainer.limit_val_batches=1", f"output_root={tmp}/outputs"]
        bare_cmd = [sys.executable, "-c", _BARE_SCRIPT, str(n), str(args.size), str(args.batch), str(steps), args.model]
        runner, bare = [], []
        for _ in range(max(1, args.repeats // 2)):
            runner.append(_peak_rss_kib(runner_cmd, Path(tmp)))
            bare.append(_peak_rss_kib(bare_cmd, Path(tmp)))
    r, b = statistics.median(runner) / 1024, statistics.median(bare) / 1024
    print(f"memory  {args.model} {args.size}px batch {args.batch}, {n} images, fp32: runner peak {r:.0f} MiB, "
          f"bare loop peak {b:.0f} MiB, ratio {r / b:.3f} (target <= 1.2)")


def main() -> None:
    """Parse arguments and run the chosen sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["step", "precision", "memory"], action="append")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-resnet50", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    sections = args.only or ["step", "precision", "memory"]
    for name in sections:
        {"step": bench_step, "precision": bench_precision, "memory": bench_memory}[name](args)


if __name__ == "__main__":
    main()
