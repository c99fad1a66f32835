"""Downloads: checksums, atomic writes, the extraction filter, and what an offline user is told."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from archives import make_cifar10_archive, make_cifar100_archive
from resnet_cli.data import cifar10, cifar100
from resnet_cli.data import download as dl
from resnet_cli.errors import UserError


def files_under(path: Path) -> set[str]:
    """Every path under `path` (relative), hidden ones included."""
    return {p.relative_to(path).as_posix() for p in path.rglob("*")} if path.exists() else set()


def evil_tar(path: Path, member: str, kind: str) -> Path:
    """A tar with one good file and one malicious member: a regular file at a bad path, or a link."""
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("data/good.txt")
        good.size = 4
        tar.addfile(good, io.BytesIO(b"good"))
        info = tarfile.TarInfo(member)
        if kind == "file":
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = "../../outside.txt" if kind == "symlink" else "/etc/passwd"
            tar.addfile(info)
            # A second member writing through the link, the classic escape.
            through = tarfile.TarInfo(f"{member}")
            through.size = 4
            tar.addfile(through, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize("member,kind", [
    ("../evil.txt", "file"),
    ("data/../../evil.txt", "file"),
    ("/tmp/resnet_cli_abs_evil.txt", "file"),
    ("data/link", "symlink"),
    ("data/hard", "hardlink"),
])
def test_malicious_archive_writes_nothing_outside_the_target(tmp_path, member, kind):
    archive = evil_tar(tmp_path / "evil.tar", member, kind)
    box = tmp_path / "box"
    target = box / "target"
    target.mkdir(parents=True)
    before = files_under(tmp_path)
    with pytest.raises(UserError, match=r"refusing to extract .*evil.tar"):
        dl.extract(archive, target)
    assert files_under(tmp_path) == before  # not even the good member: all or nothing
    assert not Path("/tmp/resnet_cli_abs_evil.txt").exists()


def test_checksum_mismatch_keeps_nothing(tmp_path):
    url, md5 = make_cifar10_archive(tmp_path / "served", n_train=20, n_test=10)
    data = tmp_path / "data"
    with pytest.raises(UserError) as err:
        cifar10(root=str(data), url=url, md5="0" * 32, seed=0)
    assert "fails its md5 check" in str(err.value) and "\n" not in str(err.value)
    assert files_under(data) == set()  # no archive, no temp folder, no extracted files
    with pytest.raises(UserError, match="fails its sha256 check"):
        dl.fetch(url, data / "a.tar.gz", sha256="f" * 64)
    assert files_under(data) == set()
    # A corrupt archive already in place is refused and named, never extracted.
    (data / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz fails its checksum"):
        cifar10(root=str(data), url=url, md5=md5, seed=0)
    assert files_under(data) == {"cifar-10-python.tar.gz"}


def test_interrupted_download_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    url, md5 = make_cifar10_archive(tmp_path / "served", n_train=20, n_test=10)

    def cut(url: str, path: Path) -> None:
        path.write_bytes(b"half an archive")
        raise OSError("connection reset")

    monkeypatch.setattr(dl, "_stream", cut)
    dest = tmp_path / "data" / "cifar-10-python.tar.gz"
    with pytest.raises(UserError, match="cannot download"):
        dl.fetch(url, dest, md5=md5)
    assert files_under(tmp_path / "data") == set()


def test_offline_says_where_to_put_the_archive(tmp_path):
    dest = tmp_path / "data" / "cifar-10-python.tar.gz"
    # Port 9 on localhost: connection refused at once, as when the network is unreachable.
    with pytest.raises(UserError) as err:
        cifar10(root=str(tmp_path / "data"), url="http://127.0.0.1:9/cifar-10-python.tar.gz", md5="0" * 32, seed=0)
    msg = str(err.value)
    assert "\n" not in msg and f"put it at {dest}" in msg
    with pytest.raises(UserError, match=f"{dest} not found; put the archive from"):
        cifar10(root=str(tmp_path / "data"), download=False, seed=0)


def test_download_without_checksum_is_refused(tmp_path):
    url, _ = make_cifar10_archive(tmp_path / "served", n_train=20, n_test=10)
    with pytest.raises(UserError, match="no checksum configured"):
        dl.fetch(url, tmp_path / "data" / "x.tar.gz")
    assert not (tmp_path / "data").exists()


def test_sha256_download_is_verified_and_atomic(tmp_path):
    url, _ = make_cifar10_archive(tmp_path / "served", n_train=20, n_test=10)
    sha = hashlib.sha256((tmp_path / "served" / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    dest = dl.fetch(url, tmp_path / "data" / "c.tar.gz", sha256=sha)
    assert dl.sha256_of(dest) == sha and files_under(tmp_path / "data") == {"c.tar.gz"}


def test_cifar100_fine_and_coarse_from_the_official_layout(tmp_path):
    url, md5 = make_cifar100_archive(tmp_path / "served", n_train=200, n_test=100)
    fine = cifar100(root=str(tmp_path / "data"), url=url, md5=md5, batch_size=50, seed=0)
    coarse = cifar100(root=str(tmp_path / "data"), url=url, md5=md5, batch_size=50, seed=0, labels="coarse")
    assert len(fine.class_names) == 100 and len(coarse.class_names) == 20
    assert fine.train.num_samples == 200 and fine.val.num_samples == 100
    y_fine = next(fine.val.iter_from(0))[1]
    y_coarse = next(coarse.val.iter_from(0))[1]
    assert (y_coarse == y_fine // 5).all()  # the fixture's superclass mapping
