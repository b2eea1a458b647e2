"""Fetching one file over HTTP(S): announced, with progress, a short timeout, md5-checked, atomic.

    fetch(Remote("CIFAR-10", ("https://.../cifar-10-python.tar.gz",), "cifar-10-python.tar.gz",
                 md5="c58f...", size=170_498_071), Path("data"))

- Before anything is fetched, one line says what, from where, how big and where to.
- Progress: a tqdm bar on a terminal, else a line every 10% (CI logs stay short).
- ``timeout`` bounds connecting and every read, so a machine without a network fails
  in seconds instead of hanging (torchvision's own downloader sets no timeout).
- The bytes go to a temporary file beside the destination, which takes the file's name
  (``os.replace``) only after the md5 matched: a half-downloaded or corrupt archive is
  never taken for data, and a failed fetch leaves nothing behind.
- ``GAF_DATA_MIRROR=URL`` fetches every file from ``URL/<file name>`` instead (an
  institutional mirror; the tests' loopback server). The md5 is checked all the same.

Errors are ``DownloadError`` (an ``OSError``) with one line saying what failed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 10.0  # connect and each read; a dead network shows within seconds
CHUNK = 1 << 20
MIRROR_ENV = "GAF_DATA_MIRROR"


class DownloadError(OSError):
    """A download that failed: unreachable, refused, cut short, or the wrong bytes."""


@dataclass(frozen=True)
class Remote:
    """One downloadable file: its public URLs (tried in order), its name on disk, md5, size."""

    what: str
    urls: tuple[str, ...]
    filename: str
    md5: str
    size: int  # bytes, announced before the download starts

    def sources(self) -> tuple[str, ...]:
        mirror = os.environ.get(MIRROR_ENV)
        return (f"{mirror.rstrip('/')}/{self.filename}",) if mirror else self.urls


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def human_size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


class _Progress:
    """tqdm on a terminal, else one line per 10%; both on stderr."""

    def __init__(self, total: int | None, label: str):
        self.total, self.label, self.done, self.next_report = total, label, 0, 0.1
        self.bar = None
        if sys.stderr.isatty() and not os.environ.get("CI"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done >= self.next_report * self.total:
            print(f"  {self.label}: {self.done / self.total:.0%} of {human_size(self.total)}", file=sys.stderr,
                  flush=True)
            while self.next_report * self.total <= self.done:
                self.next_report += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fetch_url(url: str, tmp: Path, remote: Remote, timeout: float) -> None:
    """The bytes of ``url`` into ``tmp``; raises DownloadError on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "gaf-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            progress = _Progress(total or remote.size, remote.filename)
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    progress.update(len(block))
            finally:
                progress.close()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"{url}: unreachable ({e.reason})") from None
    except (OSError, ValueError) as e:  # timeouts, resets, a body cut short (http.client.IncompleteRead)
        raise DownloadError(f"{url}: {type(e).__name__}: {e}") from None
    if total is not None and tmp.stat().st_size != total:
        raise DownloadError(f"{url}: cut short at {tmp.stat().st_size} of {total} bytes")


def fetch(remote: Remote, folder, timeout: float | None = None) -> Path:
    """Download ``remote`` into ``folder/remote.filename`` (tried URL by URL); returns the path.

    The file appears under its name only complete and with the right md5. Raises
    DownloadError naming every URL tried and why it failed.
    """
    folder, timeout = Path(folder), timeout or TIMEOUT_S
    dest = folder / remote.filename
    urls = remote.sources()
    print(f"downloading {remote.what}: {remote.filename} ({human_size(remote.size)}) from {urls[0]} into {folder}",
          file=sys.stderr, flush=True)
    made = not folder.exists()  # removed again if nothing comes of it: a refused run leaves no folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {folder} for the download: {e.strerror}") from None
    failures = []
    for url in urls:
        tmp = folder / f".{remote.filename}.{os.getpid()}.part"
        try:
            _fetch_url(url, tmp, remote, timeout)
            got = md5sum(tmp)
            if got != remote.md5:
                raise DownloadError(f"{url}: md5 {got}, expected {remote.md5} (corrupt or not the published file)")
            os.replace(tmp, dest)
            return dest
        except DownloadError as e:
            failures.append(str(e))
            print(f"  failed: {e}", file=sys.stderr, flush=True)
        finally:
            tmp.unlink(missing_ok=True)
    if made and not any(folder.iterdir()):
        folder.rmdir()
    raise DownloadError("; ".join(failures))
