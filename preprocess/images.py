"""Getting an image entry (URL, path, file:// URL or embedded bytes) to an RGB Pillow image.

Downloads are bounded (connect and read timeouts, a deadline for the whole body, a byte cap), retried with
exponential backoff on timeouts, connection errors, 429 and 5xx (never on another 4xx: a 404 stays a 404),
and cached on disk by URL so that a rerun downloads nothing. Every failure is a `Reject` with a reason class
that the rejects file and the summary count.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import ssl
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image

from shared.config import FetchConfig


class Reject(Exception):
    """A source row that cannot become a sample: `reason` is a short class, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Retryable(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class FetchedImage:
    image: Image.Image
    source: str  # the URL or path as given ("<embedded>" for bytes)
    sha256: str  # of the file's bytes
    num_bytes: int


def _http_get(url: str, cfg: FetchConfig, redirects: int = 5) -> bytes:
    """One GET with separate connect/read timeouts, a whole-body deadline and a byte cap."""
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    kwargs: dict[str, Any] = {"timeout": cfg.connect_timeout}
    if parts.scheme == "https":
        kwargs["context"] = ssl.create_default_context()
    conn = conn_cls(parts.hostname or "", parts.port, **kwargs)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        try:
            conn.connect()
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable("timeout", f"connect to {parts.netloc} timed out after {cfg.connect_timeout}s") from e
        except OSError as e:
            raise _Retryable("connection", f"cannot connect to {parts.netloc}: {e}") from e
        assert conn.sock is not None
        conn.sock.settimeout(cfg.read_timeout)
        deadline = time.monotonic() + 4 * cfg.read_timeout
        try:
            conn.request("GET", path, headers={"User-Agent": "geo3k-preprocess", "Accept": "image/*,*/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location or redirects == 0:
                    raise Reject("http-redirect", f"{url}: too many redirects or no Location")
                target = urljoin(url, location)
                if urlsplit(target).scheme not in ("http", "https"):
                    raise Reject("unsupported-scheme", f"{url} redirects to {target}")
                return _http_get(target, cfg, redirects - 1)
            if resp.status == 429 or resp.status >= 500:
                raise _Retryable("http-5xx" if resp.status >= 500 else "http-429", f"{url}: HTTP {resp.status}")
            if resp.status != 200:
                raise Reject("http-4xx" if 400 <= resp.status < 500 else "http-status", f"{url}: HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise Reject("too-many-bytes", f"{url}: {int(length)} bytes > max_bytes {cfg.max_bytes}")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise _Retryable("timeout", f"{url}: body not complete after {4 * cfg.read_timeout:g}s")
                chunk = resp.read(65536)
                if not chunk:
                    break
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise Reject("too-many-bytes", f"{url}: more than max_bytes {cfg.max_bytes}")
                chunks.append(chunk)
            if length and length.isdigit() and total != int(length):
                raise _Retryable("connection", f"{url}: got {total} of {length} bytes")
            return b"".join(chunks)
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable("timeout", f"{url}: no data for {cfg.read_timeout}s") from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable("connection", f"{url}: {e.__class__.__name__}: {e}") from e
    finally:
        conn.close()


def _download(url: str, cfg: FetchConfig) -> bytes:
    last: _Retryable | None = None
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff * 2 ** (attempt - 1))
        try:
            return _http_get(url, cfg)
        except _Retryable as e:
            last = e
    assert last is not None
    raise Reject(last.reason, f"{last.detail} (after {cfg.retries + 1} attempts)")


def _cache_path(cfg: FetchConfig, url: str) -> Path | None:
    if not cfg.cache_dir:
        return None
    h = hashlib.sha256(url.encode()).hexdigest()
    return Path(cfg.cache_dir) / h[:2] / h


def read_bytes(entry: Any, cfg: FetchConfig, base_dir: Path | None = None) -> tuple[bytes, str]:
    """The raw bytes of an image entry and a printable name for it."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            data = entry["bytes"]
            if len(data) > cfg.max_bytes:
                raise Reject("too-many-bytes", f"embedded image of {len(data)} bytes > max_bytes {cfg.max_bytes}")
            return bytes(data), str(entry.get("path") or "<embedded>")
        if entry.get("path"):
            entry = entry["path"]
        else:
            raise Reject("missing-image", "image entry has neither bytes nor path")
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry), "<embedded>"
    if not isinstance(entry, str) or not entry.strip():
        raise Reject("missing-image", f"image entry {entry!r} is not a URL, path or bytes")
    src = entry.strip()
    scheme = urlsplit(src).scheme.lower()
    if scheme in ("http", "https"):
        cache = _cache_path(cfg, src)
        if cache is not None and cache.exists():
            return cache.read_bytes(), src
        data = _download(src, cfg)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, cache)
        return data, src
    if scheme == "file":
        path = Path(unquote(urlsplit(src).path))
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        path = Path(src)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
    else:
        raise Reject("unsupported-scheme", f"{src}: only http, https, file URLs and paths are read")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise Reject("missing-image", f"{path}: {e.strerror}") from None
    if size > cfg.max_bytes:
        raise Reject("too-many-bytes", f"{path}: {size} bytes > max_bytes {cfg.max_bytes}")
    return path.read_bytes(), src


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white (as qwen-vl-utils does): a diagram drawn on a
    transparent background must not turn black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return img.convert("RGB")


def decode_image(data: bytes, name: str, cfg: FetchConfig) -> Image.Image:
    """Decode with Pillow, refusing decompression bombs before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > cfg.max_image_pixels:
                raise Reject("too-many-pixels", f"{name}: {w}x{h} = {w * h} pixels > max_image_pixels {cfg.max_image_pixels}")
            img.load()
    except Reject:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Reject("too-many-pixels", f"{name}: {e}") from None
    except Exception as e:  # Pillow raises many types for bad data (OSError, SyntaxError, ValueError...)
        raise Reject("decode", f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None
    if min(img.size) < 1:
        raise Reject("decode", f"{name}: empty image")
    return to_rgb(img)


def fetch_image(entry: Any, cfg: FetchConfig, base_dir: Path | None = None) -> FetchedImage:
    data, name = read_bytes(entry, cfg, base_dir)
    img = decode_image(data, name, cfg)
    return FetchedImage(img, name, hashlib.sha256(data).hexdigest(), len(data))
