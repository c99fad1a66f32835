"""ImageFolder hygiene: every kind of bad input stops with one line naming the file, or is skipped and counted."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archives import jpeg_bytes, write_class_folders
from resnet_cli.data import imagefolder
from resnet_cli.data.imagefolder import decode
from resnet_cli.errors import UserError

CLASSES = ["red", "green"]
# The per-image DataLoader path: bad files surface while iterating (the memory path decodes them at start-up).
SMALL = dict(image_size=16, resize=16, batch_size=4, val_batch_size=4, num_workers=0, seed=0, loader="dataloader")


def _png(mode_image: Image.Image) -> bytes:
    buf = io.BytesIO()
    mode_image.save(buf, format="PNG")
    return buf.getvalue()


def corrupt_png() -> bytes:
    """A PNG whose header reads fine but whose pixel data is scrambled (fails only when decoded)."""
    data = bytearray(_png(Image.fromarray(np.random.RandomState(0).randint(0, 255, (24, 24, 3)).astype(np.uint8))))
    start = data.index(b"IDAT") + 8
    for j in range(start, start + 32):
        data[j] ^= 0x5A
    return bytes(data)


BAD_FILES = {
    # name -> (bytes, detected by the start-up header scan?)
    "corrupt.png": (corrupt_png, False),
    "truncated.jpg": (lambda: jpeg_bytes((200, 30, 30), 40)[:700], False),
    "empty.jpg": (lambda: b"", True),
    "text.jpg": (lambda: b"this is not a picture\n", True),
}


def dataset(tmp_path: Path, bad: str | None = None, where: str = "train") -> tuple[Path, Path | None]:
    """train/ and val/ class folders of good JPEGs, plus one bad file in `where`/red/."""
    root = tmp_path / "images"
    write_class_folders(root / "train", per_class=6, size=20, classes=CLASSES)
    write_class_folders(root / "val", per_class=2, size=20, classes=CLASSES)
    if bad is None:
        return root, None
    path = root / where / "red" / bad
    path.write_bytes(BAD_FILES[bad][0]())
    return root, path


def drain(bundle) -> int:
    """Images seen in one pass over train and val."""
    return sum(len(y) for src in (bundle.train, bundle.val) for _, y in src.iter_from(0))


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_image_error_mode_names_the_file(tmp_path, bad):
    root, path = dataset(tmp_path, bad)
    with pytest.raises(UserError) as err:
        drain(imagefolder(root=str(root), on_bad_image="error", **SMALL))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "on_bad_image=skip" in msg


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_image_skip_mode_counts_and_goes_on(tmp_path, bad, caplog):
    root, path = dataset(tmp_path, bad)
    # Batches of 5: 13 train files (12 good, one found bad only when decoded) end on a batch of 3, not on a lone
    # image, which a training epoch drops (BatchNorm cannot train on it).
    b = imagefolder(root=str(root), on_bad_image="skip", max_bad_images=1, drop_last=False,
                    **{**SMALL, "batch_size": 5})
    assert drain(b) == 12 + 4  # every good image, the bad one left out
    policy = b.train.bad_policy
    assert list(policy.skipped) == [str(path)]
    assert f"skipping bad image {path}" in caplog.text
    if BAD_FILES[bad][1]:
        assert "1 bad images skipped" in b.summary  # found by the header scan at start-up


def test_verify_images_finds_decode_errors_up_front(tmp_path):
    root, path = dataset(tmp_path, "truncated.jpg", where="val")
    imagefolder(root=str(root), **SMALL)  # headers are fine: nothing found at start-up
    with pytest.raises(UserError, match="truncated.jpg"):
        imagefolder(root=str(root), verify_images=True, **SMALL)
    b = imagefolder(root=str(root), verify_images=True, on_bad_image="skip", max_bad_images=5, **SMALL)
    assert "1 bad images skipped" in b.summary and b.val.num_samples == 4


def test_bad_image_budget_is_enforced(tmp_path):
    root, _ = dataset(tmp_path, "empty.jpg")
    (root / "train" / "green" / "text.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match=r"2 bad images exceed dataset.max_bad_images=1"):
        imagefolder(root=str(root), on_bad_image="skip", max_bad_images=1, **SMALL)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_is_named(tmp_path):
    root, _ = dataset(tmp_path)
    path = root / "train" / "red" / "000.jpg"
    path.chmod(0)
    try:
        with pytest.raises(UserError, match="000.jpg"):
            imagefolder(root=str(root), **SMALL)
    finally:
        path.chmod(0o644)


def test_dangling_link_is_named(tmp_path):
    """An unreadable file that root cannot read either: a link to nowhere."""
    root, _ = dataset(tmp_path)
    (root / "train" / "red" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match=r"bad image .*gone.jpg: FileNotFoundError"):
        imagefolder(root=str(root), **SMALL)


def test_empty_class_folder_and_non_images_are_reported(tmp_path):
    root, _ = dataset(tmp_path)
    (root / "train" / "blue").mkdir()
    (root / "val" / "blue").mkdir()
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    b = imagefolder(root=str(root), **SMALL)
    assert b.class_names == sorted(CLASSES)
    assert "empty class folders dropped: blue" in b.summary and "1 non-image files ignored" in b.summary
    assert "green 6/2, red 6/2" in b.summary


def test_class_set_mismatch_lists_the_differences(tmp_path):
    root, _ = dataset(tmp_path)
    write_class_folders(root / "val", per_class=1, size=20, classes=["blue"])
    (root / "train" / "green").rename(root / "train" / "grene")
    with pytest.raises(UserError) as err:
        imagefolder(root=str(root), **SMALL)
    msg = str(err.value)
    assert "only in train: ['grene']" in msg and "only in val: ['blue', 'green']" in msg


ODD = {
    # file name -> (image, the RGB value its top-left pixel must become)
    "gray.png": (Image.new("L", (20, 20), 77), (77, 77, 77)),
    "rgba.png": (Image.new("RGBA", (20, 20), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
    "palette.png": (Image.new("RGB", (20, 20), (12, 200, 40)).convert("P", palette=Image.Palette.ADAPTIVE), (12, 200, 40)),
    "sixteen.png": (Image.fromarray(np.full((20, 20), 0x8040, dtype=np.uint16)), (0x80, 0x80, 0x80)),
    "cmyk.jpg": (Image.new("CMYK", (20, 20), (0, 0, 0, 0)), (255, 255, 255)),
}


def test_odd_colour_modes_become_rgb_the_same_way(tmp_path):
    root, _ = dataset(tmp_path)
    for name, (img, _) in ODD.items():
        img.save(root / "train" / "red" / name)
    for name, (_, rgb) in ODD.items():
        out = decode(root / "train" / "red" / name)
        assert out.mode == "RGB" and out.getpixel((0, 0)) == pytest.approx(rgb, abs=2), name
        assert np.array_equal(np.asarray(out), np.asarray(decode(root / "train" / "red" / name)))
    b = imagefolder(root=str(root), verify_images=True, augment="none", **SMALL)
    images = torch.cat([x for x, _ in b.train.iter_from(0)])
    assert images.shape[1] == 3 and len(images) == 16  # 12 + 5 images, batch 4, last partial batch dropped


def test_worker_errors_reach_the_user_as_one_line(cli, tmp_path):
    """A truncated JPEG decoded in a DataLoader worker: one line naming it, no worker traceback."""
    root, path = dataset(tmp_path, "truncated.jpg")
    common = ["dataset=imagefolder", f"dataset.root={root}", "dataset.num_workers=2", "dataset.image_size=16",
              "dataset.resize=16", "dataset.batch_size=4", "trainer=debug", "trainer.progress=false",
              "model=resnet20"]
    res = cli(*common, f"output_root={tmp_path / 'out'}", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "DataLoader worker" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-train: error: bad image") and str(path) in last
    res = cli(*common, "dataset.on_bad_image=skip", "dataset.max_bad_images=3", f"output_root={tmp_path / 'out2'}",
              env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    log = next((tmp_path / "out2").rglob("*.log")).read_text() + res.stdout + res.stderr
    assert f"skipping bad image {path}" in log


def test_a_fifo_named_like_an_image_never_blocks(cli, tmp_path):
    """A FIFO in a class folder would block any open(); it is named as a bad file instead (error or skip)."""
    root, _ = dataset(tmp_path)
    fifo = root / "train" / "red" / "pipe.jpg"
    os.mkfifo(fifo)
    common = ["dataset=imagefolder", f"dataset.root={root}", "trainer=debug", "trainer.limit_train_batches=1",
              "dataset.batch_size=4", "model=simple_cnn", f"output_root={tmp_path / 'out'}"]
    res = cli(*common, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert str(fifo) in res.stderr and "FIFO" in res.stderr
    res = cli(*common, "dataset.on_bad_image=skip", "dataset.max_bad_images=1", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"skipping bad image {fifo}" in res.stdout + res.stderr
