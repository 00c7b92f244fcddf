"""Image downloads for the primary (Uptane 2.1, 5.4.4.2 step 8; 4.3.2 endless data).

Length-capped, every hash checked by ngclient, written atomically under the
download directory, never outside it (``safe_target_path``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import quote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater

from ecus.primary.config import DownloadPolicy
from uptane.errors import EndlessDataError, ImageMismatchError, UnsafeTargetPathError
from uptane.metadata import target_relpath


def safe_target_path(base: Path, name: str) -> Path:
    """Where image ``name`` goes under ``base``; refuses anything that escapes it.

    Any name ``check_target_path`` accepts (TUF's free-form names) is mapped
    to a safe relative path by ``target_relpath`` (percent-encoded segments,
    no dot segments); the resolved path, symlinks followed, must also stay
    inside ``base``.
    """
    root = base.resolve()
    candidate = (root / target_relpath(name)).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise UnsafeTargetPathError(f"target {name!r} resolves outside the download directory")
    return candidate


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def download_image(
    updater: Updater, info: TargetFile, policy: DownloadPolicy, images_dir: Path
) -> Path:
    """Fetch one image: length-capped, every hash checked, written atomically."""
    if info.length > policy.max_image_bytes:
        raise EndlessDataError(
            f"{info.path!r} is {info.length} bytes, over the limit of {policy.max_image_bytes}"
        )
    dest = safe_target_path(images_dir, info.path)
    if dest.is_file() and updater.find_cached_target(info, str(dest)) is not None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            # ngclient appends the name to the URL as it is: quote it, so that a
            # name with "%", "?", "#" or spaces asks for that very file
            url_info = TargetFile(info.length, info.hashes, quote(info.path, safe="/"))
            updater.download_target(url_info, filepath=str(tmp))
        except tuf_exc.DownloadLengthMismatchError as e:
            raise EndlessDataError(
                f"{info.path!r}: server sent more than {info.length} bytes"
            ) from e
        except tuf_exc.LengthOrHashMismatchError as e:
            raise ImageMismatchError(f"{info.path!r} does not match its metadata: {e}") from e
        _fsync_file(tmp)
        os.replace(tmp, dest)
        _fsync_file(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
