"""The embedded dataset `shapes`: ten classes of procedural images generated in memory, no files, no download."""

from __future__ import annotations

from typing import Any, Callable

import torch

from resnet_cli.data.contract import DataBundle, generator
from resnet_cli.data.pipeline import ArraySplit, array_summary, make_bundle

# Fixed data key: the images never depend on the training seed, so runs with other
# seeds train on the same data and compare fairly.
DATA_KEY = 0x5A17E5

Geometry = dict[str, torch.Tensor]


def _stripes(coord: torch.Tensor, g: Geometry) -> torch.Tensor:
    return torch.remainder(coord + g["phase"], g["period"]) < g["period"] / 2


# Each class is a mask over the image from per-sample geometry (all tensors [n, S, S]).
CLASSES: dict[str, Callable[[Geometry], torch.Tensor]] = {
    "circle": lambda g: g["d"] < g["r"],
    "square": lambda g: torch.maximum(g["dx"].abs(), g["dy"].abs()) < 0.85 * g["r"],
    "triangle": lambda g: (g["dy"] < 0.8 * g["r"]) & (g["dy"] > -g["r"]) & (g["dx"].abs() < 0.55 * (g["dy"] + g["r"])),
    "cross": lambda g: ((g["dx"].abs() < 0.3 * g["r"]) & (g["dy"].abs() < g["r"]))
    | ((g["dy"].abs() < 0.3 * g["r"]) & (g["dx"].abs() < g["r"])),
    "horizontal stripes": lambda g: _stripes(g["y"], g),
    "vertical stripes": lambda g: _stripes(g["x"], g),
    "ring": lambda g: (g["d"] < g["r"]) & (g["d"] > 0.55 * g["r"]),
    "diagonal stripes": lambda g: torch.remainder(g["x"] + g["sign"] * g["y"] + g["phase"], 1.4 * g["period"]) < 0.7 * g["period"],
    "checkerboard": lambda g: torch.remainder(
        torch.floor((g["x"] + g["phase"]) / (0.6 * g["period"])) + torch.floor(g["y"] / (0.6 * g["period"])), 2
    ) == 0,
    "dots": lambda g: (torch.remainder(g["x"] + g["phase"], g["period"]) - g["period"] / 2) ** 2
    + (torch.remainder(g["y"] + g["phase"], g["period"]) - g["period"] / 2) ** 2 < (0.3 * g["period"]) ** 2,
}
CLASS_NAMES = list(CLASSES)


def generate_shapes(num: int, image_size: int, key: int) -> ArraySplit:
    """`num` balanced, shuffled uint8 images of size `image_size`, identical for the same (num, size, key)."""
    rng = generator(DATA_KEY, key, image_size)
    s, k = image_size, len(CLASSES)
    labels = (torch.arange(num) % k)[torch.randperm(num, generator=rng)]
    u = lambda *shape: torch.rand(*shape, generator=rng)  # noqa: E731
    one = lambda t: t.view(-1, 1, 1)  # noqa: E731
    centre_y, centre_x = (0.3 + 0.4 * u(num)) * s, (0.3 + 0.4 * u(num)) * s
    radius, period, phase = (0.2 + 0.14 * u(num)) * s, (0.2 + 0.12 * u(num)) * s, u(num) * s
    sign = torch.where(u(num) < 0.5, -1.0, 1.0)
    fg = u(num, 3)
    # Background hue kept away from the foreground so every image has contrast.
    bg = torch.remainder(fg + 0.35 + 0.3 * u(num, 3), 1.0)
    noise = 0.08 * torch.randn(num, 3, s, s, generator=rng)
    coords = torch.arange(s, dtype=torch.float32) + 0.5
    y, x = coords.view(1, s, 1).expand(num, s, s), coords.view(1, 1, s).expand(num, s, s)
    mask = torch.zeros(num, s, s, dtype=torch.bool)
    for c, draw in enumerate(CLASSES.values()):
        i = (labels == c).nonzero().squeeze(1)
        dy, dx = y[i] - one(centre_y[i]), x[i] - one(centre_x[i])
        geo = {"x": x[i], "y": y[i], "dx": dx, "dy": dy, "d": torch.sqrt(dx**2 + dy**2), "r": one(radius[i]),
               "period": one(period[i]), "phase": one(phase[i]), "sign": one(sign[i])}
        mask[i] = draw(geo)
    m = mask[:, None].float()
    images = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m + noise
    return ArraySplit((images.clamp(0, 1) * 255).round().to(torch.uint8), labels.long())


def shapes(
    *,
    num_train: int = 5000,
    num_val: int = 1000,
    image_size: int = 32,
    loader: str = "memory",
    device: Any = "cpu",
    **options: Any,
) -> DataBundle:
    """The embedded dataset as a DataBundle; `options` are the common dataset keys (see make_bundle)."""
    options = {"pad": 2, "mean": (0.5, 0.5, 0.5), "std": (0.3, 0.3, 0.3), **options}
    train, val = generate_shapes(num_train, image_size, 0), generate_shapes(num_val, image_size, 1)
    summary = array_summary("shapes", train, val, len(CLASS_NAMES))
    return make_bundle(CLASS_NAMES, train, val, image_size=image_size, loader=loader, device=device, summary=summary, **options)
