"""The loop a user writes instead of using resnet-train (the first tutorial's recipe), as the baseline.

    python bench/hand_loop.py DIR EPOCHS [MAX_BATCHES] [--no-flip]

torchvision resnet18 (3x3 stem, no max-pool, for images up to 64 px), Adam 1e-3, batch 100,
pad-4 random crop + flip, no normalisation, ImageFolder + DataLoader with 2 workers.
--no-flip drops the flip, as a user who knows their data would for digits or text.
Images larger than 64 px are resized to min(native, 224) and keep torchvision's stem.
Prints "first batch" when the first training batch is ready, then "epoch N val_acc A train_img_s R"
after each epoch (MAX_BATCHES caps the batches per epoch). The held-out folder is val/ (else
valid/, validation/ or test/, as resnet-train picks it); for a folder without one it uses the split
resnet-train saved (split-*.json), so both are judged on the same images.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import datasets, transforms as T

args = [a for a in sys.argv[1:] if a != "--no-flip"]
flip = [T.RandomHorizontalFlip()] if "--no-flip" not in sys.argv[1:] else []
root, epochs = Path(args[0]), int(args[1])
max_batches = int(args[2]) if len(args) > 2 else 0
torch.manual_seed(0)
first = next(p for p in sorted(root.rglob("*")) if p.suffix in (".png", ".jpg"))
size = min(min(Image.open(first).size), 224)
small = size <= 64
resize = [] if small else [T.Resize((size, size))]
train_tf = T.Compose([*resize, T.RandomCrop(size, padding=4), *flip, T.ToTensor()])
val_tf = T.Compose([*resize, T.ToTensor()])
held_out = next((root / d for d in ("val", "valid", "validation", "test") if (root / d).is_dir()), None)
if held_out is not None:
    train_set = datasets.ImageFolder(root / "train", train_tf, loader=lambda p: Image.open(p).convert("RGB"))
    val_set = datasets.ImageFolder(held_out, val_tf, loader=lambda p: Image.open(p).convert("RGB"))
else:  # the split resnet-train saved: same val images for both
    split = json.loads(next(root.glob("split-*.json")).read_text())
    full_t, full_v = (datasets.ImageFolder(root, tf, loader=lambda p: Image.open(p).convert("RGB")) for tf in (train_tf, val_tf))
    index = {Path(p).relative_to(root).as_posix(): i for i, (p, _) in enumerate(full_t.samples)}
    train_set = torch.utils.data.Subset(full_t, [index[p] for p in split["train"]])
    val_set = torch.utils.data.Subset(full_v, [index[p] for p in split["val"]])
classes = len(datasets.folder.find_classes(root / "train" if (root / "train").is_dir() else root)[0])
model = torchvision.models.resnet18(num_classes=classes)
if small:
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
train_dl = torch.utils.data.DataLoader(train_set, batch_size=100, shuffle=True, num_workers=2)
val_dl = torch.utils.data.DataLoader(val_set, batch_size=100, num_workers=2)
for epoch in range(epochs):
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(train_dl):
        if max_batches and i == max_batches:
            break
        if epoch == 0 and i == 0:
            print("first batch", flush=True)  # bench_folder.py times the start-up up to here
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        seen += len(y)
    rate = seen / (time.perf_counter() - start)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val_dl:
            correct += (model(x).argmax(1) == y).sum().item()
    print(f"epoch {epoch + 1} val_acc {correct / len(val_set):.4f} train_img_s {rate:.2f}", flush=True)
