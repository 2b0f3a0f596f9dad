"""Request media: turn a chat request's `video_url` into a local file that `video.load_clip` can read.

    data:video/mp4;base64,AAAA...   decoded into a private temporary file (size-capped), deleted afterwards
    file:///data/wts/videos/x.mp4   only below an allowed media directory: no `..`, symlinks resolved, the
                                    target must be a regular file
    http(s)://...                   refused: the server is offline-only (clusters pull media themselves)

    >>> resolver = MediaResolver(allowed_dirs=["/data/wts"], tmp_dir="/tmp/trafficvlm-media", max_bytes=2**26)
    >>> with resolver.open("file:///data/wts/videos/val/x.mp4") as video:
    ...     clip = load_clip(video.path, spec, cache=video.cacheable)

Error messages go back to the client, so they name the client's own spelling of the media (its file:// path
or "<data: URL>"), never a server-side temporary path or the resolved target of a symlink.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence
from urllib.parse import unquote, urlparse

DATA_LABEL = "<data: URL>"


class MediaError(Exception):
    """Media a request cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class LocalVideo:
    path: Path         # where the server reads it
    label: str         # how errors name it to the client
    cacheable: bool    # worth a frame-cache entry: a temporary file's path is never seen again


class MediaResolver:
    def __init__(self, allowed_dirs: Sequence[str | os.PathLike], tmp_dir: str | os.PathLike, max_bytes: int):
        # Resolved once: a request path must resolve below one of these real directories.
        self.allowed_dirs = [Path(os.path.realpath(d)) for d in allowed_dirs]
        self.tmp_dir = Path(tmp_dir)
        self.max_bytes = max_bytes

    @contextlib.contextmanager
    def open(self, url: str) -> Iterator[LocalVideo]:
        """The video a URL names, as a local file for the duration of the `with` block."""
        if not isinstance(url, str) or not url:
            raise MediaError(400, "video_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            path = self._write_data_url(url)
            try:
                yield LocalVideo(path, DATA_LABEL, cacheable=False)
            finally:
                path.unlink(missing_ok=True)
        elif scheme == "file":
            yield self._local_file(url)
        elif scheme in ("http", "https"):
            raise MediaError(400, "this server is offline-only and does not fetch http(s) URLs; send the video "
                                  "as a data:video/mp4;base64,... URL or as a file:// URL under an allowed media "
                                  "directory")
        else:
            raise MediaError(400, f"unsupported video URL scheme {scheme or '(none)'!r}; use data: or file://")

    # --- data: URLs -------------------------------------------------------------------------------------

    def _write_data_url(self, url: str) -> Path:
        header, sep, payload = url.partition(",")
        if not sep:
            raise MediaError(400, "malformed data: URL (no ',' before the payload)")
        params = header[len("data:"):].split(";")
        media_type = params[0].strip().lower()
        if "base64" not in (p.strip().lower() for p in params[1:]):
            raise MediaError(400, "data: URL must be base64-encoded (data:video/mp4;base64,...)")
        if media_type and not (media_type.startswith("video/") or media_type == "application/octet-stream"):
            raise MediaError(400, f"data: URL media type {media_type!r} is not a video type")
        # Check the decoded size before decoding: 4 base64 characters carry 3 bytes.
        if len(payload) // 4 * 3 > self.max_bytes:
            raise MediaError(413, f"video is larger than the server's limit of {self.max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MediaError(400, f"data: URL payload is not valid base64 ({exc})") from None
        if not data:
            raise MediaError(400, "data: URL carries an empty video")
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-", suffix=".mp4")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    # --- file:// URLs -----------------------------------------------------------------------------------

    def _local_file(self, url: str) -> LocalVideo:
        if not self.allowed_dirs:
            raise MediaError(403, "file:// URLs are disabled on this server (it was started without "
                                  "--allowed-media-dir); send the video as a data: URL")
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(400, f"file:// URL names a remote host {parsed.netloc!r}; only local files")
        raw = unquote(parsed.path)
        if "\x00" in raw or not raw.startswith("/"):
            raise MediaError(400, "file:// URL must hold an absolute path (file:///dir/video.mp4)")
        if ".." in PurePosixPath(raw).parts:
            raise MediaError(403, f"{raw}: '..' is not allowed in media paths")
        real = Path(os.path.realpath(raw))  # follows every symlink, so a link pointing out is caught here
        if not any(real == d or real.is_relative_to(d) for d in self.allowed_dirs):
            raise MediaError(403, f"{raw}: outside the server's allowed media directories")
        if not real.exists():
            raise MediaError(404, f"{raw}: no such file")
        if not real.is_file():
            raise MediaError(400, f"{raw}: not a regular file")
        return LocalVideo(real, raw, cacheable=True)
