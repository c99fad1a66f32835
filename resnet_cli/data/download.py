"""Archives: download with a checksum, write atomically, extract with a path filter."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from torchvision.datasets.utils import check_integrity
from tqdm import tqdm

from resnet_cli.errors import UserError


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stream(url: str, path: Path) -> None:
    # Our own copy loop rather than torchvision's download_url: that one writes straight
    # to the final name and needs an HTTP Content-Length, which file:// URLs lack.
    request = urllib.request.Request(url, headers={"User-Agent": "resnet-cli"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=path.name, disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _verified(path: Path, md5: str | None, sha256: str | None) -> bool:
    # md5 through torchvision's helper (the digests it publishes); sha256 wherever we hold one.
    if md5 and not check_integrity(str(path), md5):
        return False
    return not sha256 or sha256_of(path) == sha256.lower()


def fetch(url: str, dest: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None, download: bool = True) -> Path:
    """Make sure `dest` holds the verified archive from `url`, downloading it atomically if needed.

    The download goes to a temporary folder beside `dest`, is verified, then moved
    into place with os.replace, so an interrupted or corrupt download never leaves a
    file that looks complete. Without a pinned md5 or sha256 nothing is downloaded.
    """
    dest = Path(dest)
    if not (md5 or sha256):
        raise UserError(
            f"no checksum configured for {url}; set dataset.sha256=<hex digest> (or dataset.md5) "
            f"so the archive can be verified"
        )
    if dest.is_file():
        if _verified(dest, md5, sha256):
            return dest
        raise UserError(f"{dest} fails its checksum (expected {md5 or sha256}); delete it and run again to re-download it")
    if not download:
        raise UserError(f"{dest} not found; put the archive from {url} there, or set dataset.download=true")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        part = tmp / dest.name
        try:
            _stream(url, part)
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"cannot download {url} ({getattr(exc, 'reason', exc)}); download it by hand and put it at {dest}"
            ) from None
        if md5 and not check_integrity(str(part), md5):
            raise UserError(f"download of {url} fails its md5 check (expected {md5}); nothing was kept, try again")
        if sha256 and sha256_of(part) != sha256.lower():
            raise UserError(f"download of {url} fails its sha256 check (expected {sha256}); nothing was kept, try again")
        os.replace(part, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _unsafe_reason(member: tarfile.TarInfo, target: Path) -> str | None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or (name.parts and ":" in name.parts[0]):
        return "absolute path"
    if ".." in name.parts:
        return "'..' in the path"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        base = target / name.parent if member.issym() else target
        resolved = os.path.normpath(base / link) if not link.is_absolute() else str(link)
        if link.is_absolute() or os.path.commonpath([resolved, str(target)]) != str(target):
            return f"link to {member.linkname} outside the target"
    elif not (member.isfile() or member.isdir()):
        return "device, fifo or other special file"
    return None


def extract(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract a tar archive into `target` all or nothing; refuse absolute paths, '..' and outward links.

    Every member is checked before anything is written, then tarfile's "data"
    filter extracts into a temporary folder beside the target, and the top-level
    entries are moved into place only once the whole archive is out.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                reason = _unsafe_reason(m, target)
                if reason:
                    raise UserError(f"refusing to extract {archive}: member '{m.name}' has {reason}")
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
            try:
                tar.extractall(tmp, members=members, filter="data")
                tops = sorted(p.name for p in tmp.iterdir())
                for top in tops:
                    if not (target / top).exists():
                        os.replace(tmp / top, target / top)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, tarfile.FilterError):
            raise UserError(f"refusing to extract {archive}: {exc}") from None
        raise UserError(f"cannot extract {archive} ({exc}); delete it and run again to re-download it") from None
    return [target / t for t in tops]


def fetch_and_extract(
    url: str, root: str | os.PathLike, folder: str, *, filename: str | None = None,
    md5: str | None = None, sha256: str | None = None, download: bool = True,
) -> Path:
    """`root/folder`, extracting (and first fetching) the archive from `url` when the folder is missing."""
    root = Path(root)
    out = root / folder
    if out.is_dir():
        return out
    archive = fetch(url, root / (filename or os.path.basename(url)), md5=md5, sha256=sha256, download=download)
    extract(archive, root)
    if not out.is_dir():
        raise UserError(f"{archive} does not contain the folder '{folder}'; delete it and check dataset.url")
    return out
