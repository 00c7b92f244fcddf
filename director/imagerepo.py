"""The Director's view of the Image repository (Uptane 2.1, 5.2.3; DESIGN 6).

Before it assigns an image, the Director looks the image up in the Image
repository with a python-tuf ngclient ``Updater`` bootstrapped from the Image
repository's trusted root (from config), so the length, hashes and SHALL-match
fields it copies into its own targets are ones the Image repository signed.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from director.errors import ImageRepoUnavailableError, NotInitialisedError, UnknownImageError


class ImageRepoReader:
    """Looks up targets in the Image repository at ``url`` (thread-safe)."""

    def __init__(
        self,
        url: str,
        trusted_root: bytes,
        metadata_dir: str | Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._root = trusted_root
        if metadata_dir is None:
            self._tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
                prefix="director-image-repo-"
            )
            metadata_dir = self._tmp.name
        else:
            self._tmp = None
        self.metadata_dir = Path(metadata_dir)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def lookup(self, name: str) -> TargetFile:
        """Refresh the Image repository and return its ``TargetFile`` for ``name``.

        Raises ``UnknownImageError`` if no targets role lists it and
        ``ImageRepoUnavailableError`` if the metadata cannot be fetched or
        fails verification.
        """
        with self._lock:
            try:
                updater = Updater(
                    str(self.metadata_dir),
                    f"{self.url}/metadata/",
                    config=UpdaterConfig(),
                    bootstrap=self._root,
                )
                updater.refresh()
                info = updater.get_targetinfo(name)
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError, ValueError) as e:
                raise ImageRepoUnavailableError(
                    f"cannot refresh the Image repository at {self.url}: {type(e).__name__}: {e}"
                ) from e
        if info is None:
            raise UnknownImageError(f"the Image repository does not list {name!r}")
        return info

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class NoImageRepo:
    """Stand-in when no Image repository is configured: every assignment is refused."""

    def lookup(self, name: str) -> TargetFile:
        raise NotInitialisedError(
            "no Image repository configured (image_repo_url and image_repo_root in director.json)"
        )

    def close(self) -> None:
        pass
