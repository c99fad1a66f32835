"""The data layer trusts no file it did not just check: on the real `resnet-train`, with the files an adversary leaves.

EXIF orientation, the decoded cache and the split manifest read back, GIFs, a thousand classes, batches of
one. Each case checks the outcome a user sees: the exit code, one stderr line for a refusal, the summary's
numbers, the pixels trained on, and that nothing outside the run folder (and the decoded cache, where a
run is meant to write it) was created or changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import resnet_train_cmd
from test_reliability import assert_one_line

RUN = ["trainer.device=cpu", "trainer.progress=false", "trainer.epochs=1"]
QUARTER = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the turn it asks


def pixels(seed: int, w: int = 8, h: int = 8) -> np.ndarray:
    """A random RGB image (h, w, 3) of a given seed."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, orientation: int | None = None, **kw) -> Path:
    """Write an image file (format from the suffix), with an EXIF orientation tag when asked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    Image.fromarray(array).save(path, **kw)
    return path


def two_class_tree(root: Path, n_train: int = 4, n_val: int = 1, suffixes: str = ".png .png") -> Path:
    """root/train/{a,b}/ and root/val/{a,b}/ of 8-px random images (class b's files end in the second suffix):
    a layout that writes no manifest."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, (name, suffix) in enumerate(zip("ab", suffixes.split())):
            for i in range(n):
                save(root / split / name / f"{i}{suffix}", pixels(1000 * c + 100 * (split == "val") + i))
    return root


def files(folder: Path, *skip: Path) -> dict[str, bytes]:
    """Every file under folder but those under `skip` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)}


def train(tmp_path: Path, *args: str, run: str = "run", wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """`resnet-train ARGS` in a subprocess, its run folder tmp/<run>, its decoded cache tmp/cache."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RESNET_CLI_CACHE": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [*(wrap or []), *resnet_train_cmd(), *RUN, f"hydra.run.dir={tmp_path / run}",
           f"output_root={tmp_path / 'outputs'}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def train_inproc(monkeypatch, capsys, tmp_path: Path, *args: str, run: str = "run") -> subprocess.CompletedProcess:
    """`train` through resnet-train's console entry point in this process (no torch import per run)."""
    from resnet_cli import train as entry

    monkeypatch.setenv("RESNET_CLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["resnet-train", *RUN, f"hydra.run.dir={tmp_path / run}",
                                      f"output_root={tmp_path / 'outputs'}", *args])
    code = 0
    try:
        entry.main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out.out, out.err)


def summary(res: subprocess.CompletedProcess) -> str:
    """The start-up `data:` line."""
    assert res.returncode == 0, res.stderr[-3000:]
    return next(ln for ln in res.stdout.splitlines() if " - data: " in ln)


def cached_arrays(tmp_path: Path, split: str) -> list[Path]:
    """The decoded-cache arrays of one split."""
    return sorted((tmp_path / "cache").glob(f"*/{split}-*px-*.npy"))


# -- 1. EXIF orientation ------------------------------------------------------------------------------------


def test_exif_orientation_is_what_the_summary_sizes_and_the_trained_pixels_show(tmp_path):
    # Phone photos: stored 16 wide x 8 high with a tag saying "turn a quarter", displayed 8 wide x 16 high.
    root = tmp_path / "photos"
    stored = {}
    for split, n in (("train", 2), ("val", 1)):
        for name, suffix, tag in (("a", ".png", 6), ("b", ".jpg", 8)):
            for i in range(n):
                path = save(root / split / name / f"{i}{suffix}", pixels(len(stored), 16, 8), tag,
                            **({"quality": 95} if suffix == ".jpg" else {}))
                stored[path] = tag
    before = files(tmp_path)
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn", "dataset.loader=memory",
                "dataset.batch_size=2", "trainer.dry_run=true")
    line = summary(res)
    assert "sizes 8x16" in line, line  # as displayed (the stored 16x8 would say "sizes 16x8")
    assert files(tmp_path, tmp_path / "run", tmp_path / "cache") == before  # the photos are untouched
    # The decoded cache holds each train image turned as displayed, then resized and centre-cropped to 8 px.
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize(8, antialias=True), v2.CenterCrop(8)])
    train_files = sorted(p for p in stored if p.parts[-3] == "train")
    expected = torch.stack([tf(Image.open(p).convert("RGB").transpose(QUARTER[stored[p]])) for p in train_files])
    (array,) = cached_arrays(tmp_path, "train")
    got = torch.from_numpy(np.load(array))
    assert got.shape == (4, 3, 8, 8) and torch.equal(got, expected)


def test_the_summary_names_only_sizes_the_images_have():
    from resnet_cli.data.scan import size_range

    # Portrait and landscape phone photos are two sizes, not a range through sizes no photo has.
    assert size_range([(4032, 3024)] * 3 + [(3024, 4032)] * 5) == "sizes 3024x4032, 4032x3024"
    assert size_range([(32, 32)] * 4) == "sizes 32x32"
    assert size_range([(w, 20 + w) for w in range(28, 60)]) == "widths 28..59, heights 48..79 px"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_decode_and_read_size_agree_on_every_orientation(tmp_path, suffix):
    from resnet_cli.data.images import decode, read_size

    transposes = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
    kw = {".jpg": {"quality": 95}, ".webp": {"lossless": True}}.get(suffix, {})
    for tag in range(1, 9):
        path = save(tmp_path / f"{tag}{suffix}", pixels(tag, 12, 6), tag, **kw)
        with Image.open(path) as raw:  # Pillow's TIFF reader turns the image itself; the others do not
            raw.load()
            plain = raw.convert("RGB")
            if suffix != ".tif" and tag != 1:
                plain = plain.transpose(transposes[tag])
        shown = decode(path)
        assert read_size(path) == shown.size == plain.size == ((6, 12) if tag >= 5 else (12, 6)), (tag, shown.size)
        assert np.array_equal(np.asarray(shown), np.asarray(plain)), tag


# -- 2. The decoded cache and the split manifest ----------------------------------------------------------


def _zeros(path: Path) -> None:
    np.save(path, np.zeros_like(np.load(path)))  # a valid header over black images


def _float64(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _index_list(path: Path) -> None:
    (path.parent / "index.json").write_text("[]\n")


def test_a_tampered_decoded_cache_is_rebuilt_with_one_warning(tmp_path, monkeypatch, capsys, keep_logging):
    root = two_class_tree(tmp_path / "data")
    before = files(root)
    args = ["dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn", "dataset.loader=memory",
            "dataset.batch_size=4", "trainer.dry_run=true"]
    assert "decoded cache 8 px: miss" in summary(train(tmp_path, *args))  # the real command writes the cache
    (array,) = cached_arrays(tmp_path, "train")
    good = array.read_bytes()
    assert "hit, no image opened" in summary(train_inproc(monkeypatch, capsys, tmp_path, *args, run="hit"))
    for n, tamper in enumerate((_zeros, _float64, _truncated, _index_list)):
        tamper(array)
        res = train_inproc(monkeypatch, capsys, tmp_path, *args, run=f"again{n}")
        line = summary(res)
        assert "decoded cache 8 px: miss, decoded train" in line, (tamper.__name__, line)
        named = array if tamper is not _index_list else array.parent / "index.json"
        warnings = [ln for ln in res.stdout.splitlines() if "WARNING" in ln and "cache" in ln]
        assert len(warnings) == 1 and str(named) in warnings[0], (tamper.__name__, warnings)
        assert "Traceback" not in res.stdout + res.stderr
        assert array.read_bytes() == good, tamper.__name__  # decoded again: the true images, not the tampered ones
    assert files(root) == before


def _manifest(**fields) -> dict:
    data = {"version": 1, "val_fraction": 0.1, "split_seed": 0, "classes": ["a", "b"],
            "train": ["a/0.png", "a/1.png", "b/0.png", "b/1.png"], "val": ["a/2.png", "b/2.png"]}
    return {**data, **fields}


MALFORMED = {
    "a list": ([], "not a JSON object"),
    "not JSON": ("{'version': 1,", "unreadable"),
    "train a string": (_manifest(train="a/0.png"), "train: not a list"),
    "non-string paths": (_manifest(val=[1, 2]), "is not a file path"),
    "a path climbing out": (_manifest(val=["a/2.png", "../outside.png"]), "not a path inside the data folder"),
    "an absolute path": (_manifest(val=["/etc/passwd"]), "not a path inside the data folder"),
    "a file in both splits": (_manifest(val=["a/0.png", "b/2.png"]), "in both train and val"),
    "classes not names": (_manifest(classes={"a": 1}), "classes is not a list"),
    "another version": (_manifest(version=7), "version 7"),
    "a file listed twice": (_manifest(train=["a/0.png", "a/1.png", "a/0.png"]), "'a/0.png' is listed twice"),
    "nested too deep to parse": ("[" * 100_000 + "]" * 100_000, "unreadable"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_split_manifest_is_one_line_and_left_as_it_is(tmp_path, case, monkeypatch, capsys, keep_logging):
    content, why = MALFORMED[case]
    root = tmp_path / "data"
    for c, name in enumerate("ab"):
        for i in range(3):
            save(root / name / f"{i}.png", pixels(10 * c + i))
    manifest = root / "split-val0.1-seed0.json"
    manifest.write_text(content if isinstance(content, str) else json.dumps(content))
    before = files(tmp_path)
    res = train_inproc(monkeypatch, capsys, tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn")
    assert_one_line(res, str(manifest), why, "delete it to re-split")
    assert files(tmp_path, tmp_path / "run") == before  # the manifest as it was, nothing cached, nothing written


def test_a_class_folder_added_after_the_split_is_refused(tmp_path, monkeypatch, capsys, keep_logging):
    root = tmp_path / "data"
    for c, name in enumerate("abc"):
        for i in range(3):
            save(root / name / f"{i}.png", pixels(10 * c + i))
    manifest = root / "split-val0.1-seed0.json"
    manifest.write_text(json.dumps(_manifest()))  # saved when only a/ and b/ existed
    before = files(tmp_path)
    res = train_inproc(monkeypatch, capsys, tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn")
    line = assert_one_line(res, str(manifest), "delete the manifest to re-split")
    assert "class folder c added" in line, line
    assert files(tmp_path, tmp_path / "run") == before


def test_a_datasets_own_manifest_json_is_never_written_over(tmp_path):
    # A val/ tree keeps `mean: auto` in manifest.json, a name a dataset may use for a file of its own.
    root = two_class_tree(tmp_path / "data")
    theirs = root / "manifest.json"
    theirs.write_text('[{"file": "train/a/0.png", "license": "CC-BY"}]\n')
    before = files(tmp_path)
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn", "dataset.mean=auto",
                "dataset.std=auto", "dataset.batch_size=4", "trainer.dry_run=true")
    assert "train 8 / val 2" in summary(res)
    assert files(tmp_path, tmp_path / "run", tmp_path / "cache") == before


# -- 3. GIFs ------------------------------------------------------------------------------------------------


def test_gif_class_members_are_trained_on_and_counted(tmp_path):
    root = two_class_tree(tmp_path / "data", suffixes=".png .gif")  # class b: GIFs only (palette images)
    before = files(root)
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn", "dataset.batch_size=4")
    line = summary(res)
    assert "train 8 / val 2" in line and "b 4/1" in line and "non-image" not in line, line
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert files(root) == before


# -- 4. Cost bounded in classes ---------------------------------------------------------------------------

# Peak memory of a 1,000-class run. Measured on the 2-core development machine: 0.93 GB for 1,000 classes,
# 0.92 GB for 10 classes of the same 2,000 images (torch, TensorBoard and the run itself); the whole
# 1,000-class confusion matrix drawn as one picture was about 26,000 px square, 8 GB as a float tensor alone,
# and the run was killed at 22.5 GB. 2.5 GB leaves room for other torch builds and catches any picture or
# table that grows with the square of the class count.
PEAK_BOUND_KB = 2_500_000
MAX_PICTURE_SIDE = 1600  # 30 classes of 26-px cells plus their labels; a misclassified or augmented grid


def test_a_thousand_classes_train_in_bounded_memory_with_bounded_pictures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "data"
    long_name = "c0005_" + "x" * 200  # a 206-character class name: captions and labels must stay narrow
    for c in range(1000):
        name = long_name if c == 5 else f"c{c:04d}"
        for split in ("train", "val"):
            save(root / split / name / "0.png", pixels(2 * c + (split == "val")))
    before = files(root)
    meter = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"]
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn",
                "dataset.batch_size=32", wrap=meter)
    line = summary(res)
    assert "1000 classes, train 1000 / val 1000 images" in line and "... (992 more)" in line and len(line) < 1000
    peak = int(res.stdout.rsplit("peak_kb", 1)[1].split()[0])
    assert peak < PEAK_BOUND_KB, peak
    assert files(root) == before
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/confusion_matrix", "val/misclassified", "train/augmented_batch"} <= set(tags["images"])
    for tag in tags["images"]:
        img = events.Images(tag)[-1]
        assert img.width <= MAX_PICTURE_SIDE and img.height <= MAX_PICTURE_SIDE, (tag, img.width, img.height)
    assert not [t for t in tags["scalars"] if "per_class" in t]  # not 1,000 TensorBoard tags
    table = events.Tensors("val/per_class_accuracy/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "least accurate of 1000 classes" in table and len(table.splitlines()) <= 40


# -- 5. A batch of one into BatchNorm ---------------------------------------------------------------------


@pytest.mark.parametrize("loader, extra", [
    ("memory", ["trainer.precise_bn_images=0"]),
    # Validation batches of one are fine, but BatchNorm's re-estimate (update_bn) runs in train mode on the
    # 17 calibration images: it takes them in batches of at least two, and never ends on a lone one.
    ("dataloader", ["dataset.val_batch_size=1"]),
])
def test_a_final_train_batch_of_one_is_dropped_not_a_crash(tmp_path, loader, extra):
    # 9 + 8 train images in batches of 4 leave one image over; resnet18 at 8 px reaches 1x1 maps, where
    # BatchNorm in train mode raises on a batch of one.
    root = two_class_tree(tmp_path / "data", n_train=8, n_val=2)
    save(root / "train" / "a" / "8.png", pixels(77))
    before = files(root)
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=resnet18", "dataset.batch_size=4",
                "dataset.drop_last=false", f"dataset.loader={loader}", "dataset.num_workers=0", *extra)
    assert "train 17 / val 4" in summary(res)
    assert "1 epochs x 4 steps" in res.stdout  # 4 full batches; the lone 17th image is not a batch
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["finished"] is True
    assert files(root) == before


def test_batch_size_one_with_batchnorm_is_refused_at_start_up(tmp_path, monkeypatch, capsys, keep_logging):
    root = two_class_tree(tmp_path / "data")
    before = files(tmp_path)
    res = train(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=resnet18", "dataset.batch_size=1")
    assert_one_line(res, "dataset.batch_size=1", "BatchNorm")
    assert not (tmp_path / "run" / "last.pt").exists()
    # The data was read (and its decoded cache kept for the next run) before the model was built; the rest as it was.
    assert files(tmp_path, tmp_path / "run", tmp_path / "cache") == before
    # Without BatchNorm a batch of one is a valid choice.
    ok = train_inproc(monkeypatch, capsys, tmp_path, "dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn",
                      "dataset.batch_size=1", "trainer.dry_run=true", run="plain")
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.parametrize("n, batch, drop_last, train_batches, val_batches",
                         [(9, 4, False, 2, 3), (10, 4, False, 3, 3), (9, 4, True, 2, 3), (1, 1, False, 1, 1)])
def test_both_sources_count_and_yield_the_same_batches(n, batch, drop_last, train_batches, val_batches):
    from resnet_cli.data.loader import LoaderSource
    from resnet_cli.data.memory import MemorySource
    from resnet_cli.data.pipeline import ArraySplit, TensorImages

    images, labels = torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long)
    for train_, want in ((True, train_batches), (False, val_batches)):
        sources = [MemorySource(images, labels, batch_size=batch, train=train_, seed=0, drop_last=drop_last),
                   LoaderSource(TensorImages(ArraySplit(images, labels)), lambda x: x.float(), batch_size=batch,
                                train=train_, seed=0, drop_last=drop_last)]
        for src in sources:
            sizes = [len(y) for _, y in src.iter_from(0)]
            assert len(src) == len(sizes) == want, (type(src).__name__, train_, sizes)
            assert not train_ or batch == 1 or 1 not in sizes
