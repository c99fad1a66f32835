"""Pictures and tables of a model's behaviour: image grids, confusion matrices, per-class accuracy.

Images are returned as float CHW tensors in [0, 1], the form TensorBoard's
`add_image` takes. Text is drawn with PIL's built-in font so no plotting library
is needed.

Every picture, table and set of TensorBoard tags is bounded in the class count: above
MAX_SHOWN_CLASSES classes the confusion matrix shows the most confused classes, the per-class
table the least accurate ones, and no per-class scalars are logged; class names are cut to a
readable length. (A 1,000-class matrix drawn whole was 26,000 px square: 8 GB as floats.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from resnet_cli.fileio import atomic_write

_TILE = 64  # pixels per thumbnail side in the misclassified grid (small images are scaled up)
_CELL = 26  # pixels per confusion-matrix cell
MAX_SHOWN_CLASSES = 30  # classes in a confusion-matrix picture, rows of a per-class table, per-class scalars
_NAME_CHARS = 24  # a class name in a caption or a matrix label is cut to this many characters


def short_name(name: str, limit: int = _NAME_CHARS) -> str:
    """A class name cut to `limit` characters (with '...'), so captions and labels keep a bounded width."""
    name = str(name)
    return name if len(name) <= limit else name[:limit - 3] + "..."


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the dataset's Normalize: float NCHW in [0, 1] for display."""
    images = images.detach().float().cpu()
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return (images * s + m).clamp(0.0, 1.0)


def image_grid(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], nrow: int = 8) -> torch.Tensor:
    """A grid (CHW, [0, 1]) of normalized images as the network sees them, e.g. after augmentation."""
    return make_grid(denormalize(images, mean, std), nrow=nrow, padding=2, pad_value=1.0)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true, predicted] (int64, num_classes x num_classes)."""
    flat = target.long().cpu() * num_classes + pred.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> list[float]:
    """Recall of each class from a confusion matrix (0.0 for a class with no samples)."""
    totals = cm.sum(1).clamp(min=1)
    return (cm.diagonal().double() / totals).tolist()


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)


def _pairs(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    # The non-zero cells of the confusion matrix as (true, predicted, count), from the samples: memory in the
    # number of samples, never num_classes squared.
    flat = target.long().cpu() * num_classes + pred.long().cpu()
    cells, counts = torch.unique(flat, return_counts=True)
    return cells // num_classes, cells % num_classes, counts


def most_confused(true: torch.Tensor, pred: torch.Tensor, count: torch.Tensor, recall: torch.Tensor,
                  limit: int) -> torch.Tensor:
    """The classes of the largest off-diagonal cells (true != predicted), at most `limit`, in index order.

    Taken cell by cell from the largest count down; when fewer classes are confused, the least accurate
    others fill the picture.
    """
    off = true != pred
    order = torch.argsort(count[off], descending=True, stable=True)
    chosen: dict[int, None] = {}
    for t, p in zip(true[off][order].tolist(), pred[off][order].tolist()):
        for c in (t, p):
            if len(chosen) < limit:
                chosen.setdefault(c)
        if len(chosen) >= limit:
            break
    for c in torch.argsort(recall, stable=True).tolist():
        if len(chosen) >= limit:
            break
        chosen.setdefault(c)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _per_class(true: torch.Tensor, pred: torch.Tensor, count: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    # (samples per class, recall per class) from the matrix's cells.
    totals = torch.bincount(true, weights=count.double(), minlength=n)
    hits = torch.bincount(true[true == pred], weights=count[true == pred].double(), minlength=n)
    return totals, hits / totals.clamp(min=1)


def confusion_image(cm: torch.Tensor, class_names: Sequence[str], limit: int = MAX_SHOWN_CLASSES) -> torch.Tensor:
    """The confusion matrix as a picture: rows true, columns predicted, shaded by row share, counts written in.

    Above `limit` classes, only the `limit` most confused ones (most_confused) are drawn, with their own
    indices and a title saying so: the picture is bounded whatever the class count.
    """
    cells = cm.nonzero()
    true, pred = cells[:, 0], cells[:, 1]
    return _confusion_picture(true, pred, cm[true, pred], class_names, limit)


def _confusion_picture(true: torch.Tensor, pred: torch.Tensor, count: torch.Tensor, class_names: Sequence[str],
                       limit: int) -> torch.Tensor:
    """The picture of a confusion matrix given by its non-zero cells (true, predicted, count)."""
    n_all = len(class_names)
    totals, recall = _per_class(true, pred, count, n_all)
    # A class without validation samples has nothing to show: it fills the picture last.
    fill = torch.where(totals > 0, recall, torch.full_like(recall, 2.0))
    shown = torch.arange(n_all) if n_all <= limit else most_confused(true, pred, count, fill, limit)
    n = len(shown)
    pos = torch.full((n_all,), -1, dtype=torch.long)
    pos[shown] = torch.arange(n)
    keep = (pos[true] >= 0) & (pos[pred] >= 0)
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((pos[true[keep]], pos[pred[keep]]), count[keep].long(), accumulate=True)
    title = f"the {n} most confused of {n_all} classes" if n < n_all else ""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    index = shown.tolist()
    labels = [f"{c} {short_name(class_names[c])}" for c in index]
    left = max([_text_width(probe, s, font) for s in labels] + [30]) + 10
    top = 34 + (14 if title else 0)
    width = max(left + n * _CELL + 4, _text_width(probe, title, font) + 8)
    img = Image.new("RGB", (width, top + n * _CELL + 4), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((2, 2), title, fill="black", font=font)
    draw.text((left, top - 32), "predicted ->", fill="black", font=font)
    draw.text((2, top - 32), "true", fill="black", font=font)
    # Shaded by the share of the whole row (all of the class's samples), also when only some columns are drawn.
    share = cm.double() / totals[shown].clamp(min=1)[:, None]
    for j in range(n):  # column indices (the names are on the rows)
        draw.text((left + j * _CELL + 8 - 3 * max(0, len(str(index[j])) - 2), top - 14), str(index[j]),
                  fill="black", font=font)
    for i in range(n):
        draw.text((4, top + i * _CELL + 7), labels[i], fill="black", font=font)
        for j in range(n):
            v = float(share[i, j])
            # White -> blue for the share of the row; the diagonal in green so mistakes stand out.
            shade = int(255 * (1 - v))
            colour = (shade, 255 - int(95 * v), shade) if i == j else (shade, shade, 255)
            x0, y0 = left + j * _CELL, top + i * _CELL
            draw.rectangle([x0, y0, x0 + _CELL - 1, y0 + _CELL - 1], fill=colour, outline=(200, 200, 200))
            cell = int(cm[i, j])
            if cell:
                draw.text((x0 + 3, y0 + 7), str(cell), fill="white" if v > 0.6 else "black", font=font)
    return _to_tensor(img)


def labelled_grid(images: torch.Tensor, captions: Sequence[Sequence[str]], nrow: int = 4,
                  tile: int = _TILE) -> torch.Tensor:
    """Thumbnails (float NCHW in [0, 1]) with lines of text under each, as one CHW image."""
    font = _font()
    lines = max((len(c) for c in captions), default=1)
    cap_h = 12 * lines + 4
    tiles = []
    for img, caption in zip(images, captions):
        # Small images are scaled up pixel by pixel (sharp); large ones are scaled down smoothly.
        mode = TF.InterpolationMode.NEAREST if img.shape[-1] <= tile else TF.InterpolationMode.BILINEAR
        thumb = TF.resize(img, [tile, tile], interpolation=mode, antialias=True)
        pil = TF.to_pil_image(thumb)
        width = max([tile] + [_text_width(ImageDraw.Draw(pil), t, font) + 4 for t in caption])
        canvas = Image.new("RGB", (width, tile + cap_h), "white")
        canvas.paste(pil, ((width - tile) // 2, 0))
        draw = ImageDraw.Draw(canvas)
        for k, text in enumerate(caption):
            draw.text((2, tile + 2 + 12 * k), text, fill="black", font=font)
        tiles.append(canvas)
    if not tiles:
        return torch.ones(3, tile, tile)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    batch = torch.stack([_to_tensor(_pad_to(t, w, h)) for t in tiles])
    return make_grid(batch, nrow=nrow, padding=2, pad_value=0.5)


def _pad_to(tile: Image.Image, w: int, h: int) -> Image.Image:
    if tile.size == (w, h):
        return tile
    canvas = Image.new("RGB", (w, h), "white")
    canvas.paste(tile, (0, 0))
    return canvas


def misclassified_grid(wrong: dict, class_names: Sequence[str], mean: Sequence[float],
                       std: Sequence[float]) -> torch.Tensor | None:
    """The most confidently wrong images (engine.evaluate's `wrong`) captioned true / predicted; None if none."""
    if wrong.get("images") is None or len(wrong["images"]) == 0:
        return None
    images = denormalize(wrong["images"], mean, std)
    name = lambda k: short_name(class_names[int(k)])  # noqa: E731
    captions = [(f"true: {name(t)}", f"pred: {name(p)}", f"conf: {float(c):.0%}")
                for t, p, c in zip(wrong["target"], wrong["pred"], wrong["conf"])]
    return labelled_grid(images, captions)


def accuracy_table(cm: torch.Tensor, class_names: Sequence[str], limit: int = MAX_SHOWN_CLASSES) -> str:
    """Per-class accuracy and sample count as an aligned text table (terminal and TensorBoard text).

    Above `limit` classes, the `limit` least accurate ones (a first line says so).
    """
    return _class_table(class_names, per_class_accuracy(cm), cm.sum(1).tolist(), limit)


def _class_table(class_names: Sequence[str], acc: Sequence[float], counts: Sequence[float], limit: int) -> str:
    rows = list(range(len(class_names)))
    head = []
    if len(rows) > limit:
        rows = sorted(sorted(rows, key=lambda k: acc[k] if counts[k] else 2.0)[:limit])  # classes with samples
        head = [f"the {limit} least accurate of {len(class_names)} classes"]
    names = {k: short_name(class_names[k], 40) for k in rows}
    width = max([len("class")] + [len(v) for v in names.values()])
    head.append(f"{'class'.ljust(width)}  {'acc':>6}  {'n':>6}")
    return "\n".join(head + [f"{names[k].ljust(width)}  {acc[k]:6.4f}  {int(counts[k]):6d}" for k in rows])


def log_evaluation(tracker, val: dict, class_names: Sequence[str], eval_spec: dict, step: int,
                   prefix: str = "val") -> torch.Tensor | None:
    """Write the confusion matrix, per-class accuracy and misclassified grid of a collected evaluation.

    `val` is engine.evaluate(..., collect=True)'s result; returns the per-class accuracy (None when the
    evaluation collected nothing). Bounded in the class count: the matrix is computed from its non-zero
    cells, and above MAX_SHOWN_CLASSES classes no per-class scalars are logged (the table names the least
    accurate classes).
    """
    if "pred" not in val:
        return None
    n = len(class_names)
    true, pred, count = _pairs(val["pred"], val["target"], n)
    totals, recall = _per_class(true, pred, count, n)
    acc = recall.tolist()
    tracker.image(f"{prefix}/confusion_matrix", _confusion_picture(true, pred, count, class_names,
                                                                   MAX_SHOWN_CLASSES), step)
    if n <= MAX_SHOWN_CLASSES:
        tracker.scalars({f"{prefix}_per_class/{name}": a for name, a in zip(class_names, acc)}, step)
    # Markdown renders a code block verbatim, so the table stays aligned in TensorBoard's text tab.
    table = _class_table(class_names, acc, totals.tolist(), MAX_SHOWN_CLASSES)
    tracker.text(f"{prefix}/per_class_accuracy", "    " + table.replace("\n", "\n    "), step)
    grid = misclassified_grid(val.get("wrong", {}), class_names, eval_spec["mean"], eval_spec["std"])
    if grid is None:
        # Always at the confusion matrix's step, so both images open on the same epoch.
        grid = message_image(f"no errors: all {int(count.sum())} validation images classified right")
    tracker.image(f"{prefix}/misclassified", grid, step)
    return acc


def message_image(text: str, size: tuple[int, int] = (320, 64)) -> torch.Tensor:
    """A white tile (CHW, [0, 1]) with one line of text, in place of an empty picture."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((8, size[1] // 2 - 6), text, fill="black", font=_font())
    return _to_tensor(img)


def log_augmented_batch(tracker, bundle, max_images: int = 32) -> None:
    """Log one grid of the first training batch exactly as the network receives it, each tile labelled."""
    bundle.train.set_epoch(0)
    images, targets = next(iter(bundle.train.iter_from(0)))
    images, targets = images[:max_images], targets[:max_images]
    if targets.ndim == 2:  # mixup/cutmix soft targets: the dominant class
        targets = targets.argmax(1)
    names = list(bundle.class_names)
    captions = [(short_name(names[int(t)]),) for t in targets.cpu()]
    spec = bundle.eval_spec
    # Tiles at the crop size up to 128 px, at least 64 px so a class name fits under each.
    tile = max(_TILE, min(int(images.shape[-1]), 128))
    grid = labelled_grid(denormalize(images, spec["mean"], spec["std"]), captions, nrow=8, tile=tile)
    tracker.image("train/augmented_batch", grid, 0)


class GradNormProbe:
    """Measures the global gradient L2 norm just before the optimizer steps that get logged.

    An optimizer step pre-hook sees the gradients after clipping and (for fp16)
    after unscaling, i.e. what the update really uses; only every `every`-th step
    pays for the norm so the loop keeps its one-sync-per-logged-step rhythm.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, progress, every: int):
        # `progress.global_step` counts the steps done: the step about to run is the next one.
        self.progress, self.every, self.value = progress, max(1, every), None
        self.handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if (self.progress.global_step + 1) % self.every:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.value = torch.nn.utils.get_total_norm(grads) if grads else None

    def pop(self) -> float | None:
        """The latest measured norm (once), as a float."""
        value, self.value = self.value, None
        return None if value is None else float(value)


def curve_image(xs: Sequence[float], ys: Sequence[float], *, title: str, log_x: bool = True,
                mark: float | None = None, size: tuple[int, int] = (480, 300)) -> torch.Tensor:
    """A line plot (CHW, [0, 1]) of ys against xs, x on a log10 axis by default; `mark` draws a vertical line."""
    import math

    w, h = size
    left, right, top, bottom = 52, 12, 22, 30
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)  # noqa: E731
    pts = [(tx(x), y) for x, y in zip(xs, ys) if math.isfinite(y) and (x > 0 or not log_x)]
    draw.text((left, 4), title, fill="black", font=font)
    if len(pts) < 2:
        return _to_tensor(img)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(math.floor(x0), math.ceil(x1) + 1) if log_x else ():
        if x0 <= k <= x1:  # one tick per decade
            draw.line([px(k), h - bottom, px(k), h - bottom + 4], fill="black")
            draw.text((px(k) - 10, h - bottom + 6), f"1e{k}", fill="black", font=font)
    for v in (y0, (y0 + y1) / 2, y1):
        draw.text((2, py(v) - 6), f"{v:.3g}", fill="black", font=font)
    draw.line([(px(x), py(y)) for x, y in pts], fill=(30, 90, 200), width=2)
    if mark is not None and mark > 0:
        m = px(tx(mark))
        draw.line([m, top, m, h - bottom], fill=(200, 40, 40), width=1)
    return _to_tensor(img)


_SERIES_COLOURS = ((30, 90, 200), (220, 100, 20), (40, 150, 60), (170, 40, 160))


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, xlabel: str,
           series: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> None:
    """One line chart inside box (left, top, right, bottom): axes, ticks, the series and their legend."""
    import math

    font = _font()
    left, top, right, bottom = box
    draw.text((left + 40, top + 2), title, fill="black", font=font)
    x0_px, x1_px, y0_px, y1_px = left + 48, right - 8, top + 18, bottom - 28
    draw.rectangle([x0_px, y0_px, x1_px, y1_px], outline="black")
    draw.text(((x0_px + x1_px) // 2 - 3 * len(xlabel), bottom - 13), xlabel, fill="black", font=font)
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if math.isfinite(y)]
    if not points:
        draw.text((x0_px + 8, y0_px + 8), "no data", fill="black", font=font)
        return
    xa, xb = min(p[0] for p in points), max(p[0] for p in points)
    ya, yb = min(p[1] for p in points), max(p[1] for p in points)
    xb, yb = (xb if xb > xa else xa + 1), (yb if yb > ya else ya + abs(ya) * 0.1 + 1e-12)
    pad = (yb - ya) * 0.05
    ya, yb = ya - pad, yb + pad
    px = lambda v: x0_px + (v - xa) / (xb - xa) * (x1_px - x0_px)  # noqa: E731
    py = lambda v: y1_px - (v - ya) / (yb - ya) * (y1_px - y0_px)  # noqa: E731
    for k in range(5):
        v = ya + (yb - ya) * k / 4
        draw.line([x0_px - 3, py(v), x0_px, py(v)], fill="black")
        draw.text((left + 2, py(v) - 6), f"{v:.3g}", fill="black", font=font)
    for k in range(5):
        v = xa + (xb - xa) * k / 4
        draw.line([px(v), y1_px, px(v), y1_px + 3], fill="black")
        draw.text((px(v) - 8, y1_px + 4), f"{v:.4g}", fill="black", font=font)
    for n, (label, xs, ys) in enumerate(series):
        colour = _SERIES_COLOURS[n % len(_SERIES_COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) <= 60 else ():  # markers where there are few points (per-epoch curves)
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if label:
            ly = y0_px + 4 + 12 * n
            draw.line([x1_px - 70, ly + 6, x1_px - 56, ly + 6], fill=colour, width=2)
            draw.text((x1_px - 52, ly), label, fill=colour, font=font)


def training_curves(history: Sequence[dict], lr_steps: Sequence[float], max_points: int = 2000) -> Image.Image:
    """The ResNet-9 tutorial's figures in one picture: loss and accuracy per epoch (train and val), lr per step.

    `lr_steps[i]` is the lr of optimizer step i + 1; at most max_points of them are drawn (evenly spaced).
    """
    width, height = 3 * 360, 300
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    epochs = [float(r["epoch"]) for r in history]
    stride = max(1, -(-len(lr_steps) // max_points))
    picks = sorted(set(range(0, len(lr_steps), stride)) | ({len(lr_steps) - 1} if lr_steps else set()))
    _panel(draw, (0, 0, 360, height), "loss per epoch", "epoch",
           [("train", epochs, [float(r["train_loss"]) for r in history]),
            ("val", epochs, [float(r["val_loss"]) for r in history])])
    _panel(draw, (360, 0, 720, height), "accuracy per epoch", "epoch",
           [("train", epochs, [float(r["train_acc"]) for r in history]),
            ("val", epochs, [float(r["val_acc"]) for r in history])])
    _panel(draw, (720, 0, 1080, height), "learning rate per optimizer step", "step",
           [("", [i + 1.0 for i in picks], [float(lr_steps[i]) for i in picks])])
    return img


def write_curves(tracker, history: Sequence[dict], lr_steps: Sequence[float], step: int | None = None,
                 name: str = "curves.png") -> None:
    """Save training_curves as <run>/curves.png; with `step`, also log it to TensorBoard as train/curves."""
    if not tracker.enabled or not history:
        return
    img = training_curves(history, lr_steps)
    # Readers never see half a PNG; not fsynced: the next epoch writes it again.
    atomic_write(tracker.run_dir / name, lambda fh: img.save(fh, format="PNG"), durable=False)
    if step is not None:
        tracker.image("train/curves", _to_tensor(img), step)
