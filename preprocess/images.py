"""Getting an image entry (URL, path, file:// or data: URL, embedded bytes) to an RGB Pillow image.

Downloads go through httpx2 (the maintained successor of httpx, already installed as huggingface_hub's own
HTTP client, so it adds no dependency): one client per process keeps a pool of connections per host (reused
across a shard's downloads), reads proxies from the environment (HTTPS_PROXY, NO_PROXY) and verifies TLS with
the system's certificates. HTTP/2 is left off: it needs the optional h2 package, and for small image files
HTTP/1.1 with kept-alive connections already saves the handshakes. Each download is bounded by a connect timeout, a read timeout (silence between two
chunks), a wall-clock deadline over the whole body (4 x read_timeout: a server that trickles one byte at a time
is cut at the deadline, not just between reads) and a byte cap; it is retried with exponential backoff on
timeouts, connection errors, 429 and 5xx (never on another 4xx: a 404 stays a 404), and cached on disk by URL
so that a rerun downloads nothing. Only http and https are fetched, redirects included.

Local files are read the same bounded way: by bytes actually read (never trusting st_size, which is 0 for
/dev/zero or a FIFO), and only regular files. Every failure is a `Reject` with a reason class that the
rejects file and the summary count.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import socket
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from PIL import Image

try:
    import httpx2
except ImportError:  # Python 3.10: httpx2 needs 3.11; httpx, its predecessor, has the same API
    import httpx as httpx2

from shared.config import FetchConfig


class Reject(Exception):
    """A source row that cannot become a sample: `reason` is a short class, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.sha256: str | None = None  # of the image bytes, when they were read but could not be used


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


# ---------------------------------------------------------------- HTTP

_CLIENT: tuple[tuple[Any, ...], httpx2.Client] | None = None
_CLIENT_LOCK = threading.Lock()
DEADLINE_FACTOR = 4  # a whole body must arrive within DEADLINE_FACTOR x read_timeout


def http_client(cfg: FetchConfig) -> httpx2.Client:
    """The process's client (thread-safe; its pool holds up to `concurrency` connections, kept alive)."""
    global _CLIENT
    key = (cfg.connect_timeout, cfg.read_timeout, cfg.concurrency)
    with _CLIENT_LOCK:
        if _CLIENT is None or _CLIENT[0] != key:
            if _CLIENT is not None:
                _CLIENT[1].close()
            timeout = httpx2.Timeout(
                connect=cfg.connect_timeout,
                read=cfg.read_timeout,
                write=cfg.read_timeout,
                pool=DEADLINE_FACTOR * cfg.read_timeout,  # waiting for a free connection of the pool
            )
            limits = httpx2.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
            client = httpx2.Client(
                timeout=timeout,
                limits=limits,
                follow_redirects=True,
                max_redirects=5,
                headers={"User-Agent": "geo3k-preprocess", "Accept": "image/*,*/*"},
            )
            _CLIENT = (key, client)
        return _CLIENT[1]


def _cut(sock: socket.socket | None) -> None:
    """At the deadline: shut the socket down, so that a read blocked on a trickling server returns now."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _http_get(url: str, cfg: FetchConfig) -> bytes:
    """One GET with separate connect/read timeouts, a wall-clock deadline over the whole body and a byte cap."""
    budget = DEADLINE_FACTOR * cfg.read_timeout
    deadline = time.monotonic() + budget
    late = _Retryable("timeout", f"{url}: body not complete after {budget:g}s (the deadline is {DEADLINE_FACTOR} x read_timeout)")
    timer: threading.Timer | None = None
    try:
        with http_client(cfg).stream("GET", url) as resp:
            if urlsplit(str(resp.url)).scheme not in ("http", "https"):
                raise Reject("unsupported-scheme", f"{url} redirects to {resp.url}")
            status = resp.status_code
            if status == 429 or status >= 500:
                raise _Retryable("http-5xx" if status >= 500 else "http-429", f"{url}: HTTP {status}")
            if status != 200:
                raise Reject("http-4xx" if 400 <= status < 500 else "http-status", f"{url}: HTTP {status}")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise Reject("too-many-bytes", f"{url}: {int(length)} bytes > max_bytes {cfg.max_bytes}")
            stream = resp.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (sock,))
            timer.daemon = True
            timer.start()
            chunks, total = [], 0
            for chunk in resp.iter_bytes():  # decoded (gzip etc.), so the cap also bounds what a bomb inflates to
                if time.monotonic() > deadline:
                    raise late
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise Reject("too-many-bytes", f"{url}: more than max_bytes {cfg.max_bytes}")
                chunks.append(chunk)
            if time.monotonic() > deadline:
                raise late
            return b"".join(chunks)
    except (Reject, _Retryable):
        raise
    except httpx2.TooManyRedirects:
        raise Reject("http-redirect", f"{url}: more than 5 redirects") from None
    except httpx2.UnsupportedProtocol as e:
        raise Reject("unsupported-scheme", f"{url}: {e} (only http and https are fetched)") from None
    except httpx2.ConnectTimeout:
        raise _Retryable("timeout", f"{url}: connect timed out after {cfg.connect_timeout:g}s") from None
    except httpx2.TimeoutException:
        raise _Retryable("timeout", f"{url}: no data for {cfg.read_timeout:g}s") from None
    except (httpx2.TransportError, httpx2.StreamError, OSError) as e:
        if time.monotonic() > deadline:  # our own cut at the deadline surfaces as a read error
            raise late from None
        raise _Retryable("connection", f"{url}: {e.__class__.__name__}: {e}") from None
    except httpx2.InvalidURL as e:
        raise Reject("bad-url", f"{url}: {e}") from None
    finally:
        if timer is not None:
            timer.cancel()


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


def cache_path(cfg: FetchConfig, url: str) -> Path | None:
    if not cfg.cache_dir:
        return None
    h = hashlib.sha256(url.encode()).hexdigest()
    return Path(cfg.cache_dir) / h[:2] / h


def _store_in_cache(cache: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written (full, read-only) costs a download next time, never a row."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- local files and entries


def read_local(path: Path, max_bytes: int, name: str | None = None) -> bytes:
    """A regular file's bytes, at most max_bytes of them (counted as read, not taken from st_size)."""
    name = name or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below like any non-file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise Reject("missing-image", f"{name}: no such file") from None
    except OSError as e:
        raise Reject("unreadable-image", f"{name}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (device, FIFO or socket)"
        raise Reject("not-a-file", f"{name} is {kind}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise Reject("unreadable-image", f"{name}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise Reject("too-many-bytes", f"{name}: more than max_bytes {max_bytes}")
    return data


def _embedded(data: Any, max_bytes: int) -> bytes:
    """Embedded image bytes: raw bytes, or base64 text (how JSON exports of image datasets carry them)."""
    if isinstance(data, str):
        if len(data) > 4 * (max_bytes // 3 + 1) + 4:
            raise Reject("too-many-bytes", f"embedded base64 image of {len(data)} characters > max_bytes {max_bytes}")
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise Reject("bad-image-entry", "embedded image bytes are text but not base64") from None
    elif isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise Reject("bad-image-entry", f"embedded image bytes are a {type(data).__name__}, not bytes or base64 text")
    if len(data) > max_bytes:
        raise Reject("too-many-bytes", f"embedded image of {len(data)} bytes > max_bytes {max_bytes}")
    return data


def _data_url(src: str, max_bytes: int) -> bytes:
    head, sep, payload = src.partition(",")
    if not sep:
        raise Reject("bad-image-entry", "a data: URL without a comma")
    if head.endswith(";base64"):
        return _embedded(payload, max_bytes)
    return _embedded(unquote_to_bytes(payload), max_bytes)


def local_path(src: str, base_dir: Path | None) -> Path | None:
    """The file an entry names (path or file:// URL), or None for URLs that are not local."""
    scheme = urlsplit(src).scheme.lower()
    if scheme == "file":
        return Path(unquote(urlsplit(src).path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        path = Path(src)
        return base_dir / path if not path.is_absolute() and base_dir is not None else path
    return None


def read_bytes(entry: Any, cfg: FetchConfig, base_dir: Path | None = None) -> tuple[bytes, str]:
    """The raw bytes of an image entry and a printable name for it."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            return _embedded(entry["bytes"], cfg.max_bytes), str(entry.get("path") or "<embedded>")
        if entry.get("path"):
            entry = entry["path"]
        else:
            raise Reject("missing-image", "image entry has neither bytes nor path")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return _embedded(entry, cfg.max_bytes), "<embedded>"
    if not isinstance(entry, str) or not entry.strip():
        raise Reject("missing-image", f"image entry {str(entry)[:80]!r} is not a URL, path or bytes")
    src = entry.strip()
    scheme = urlsplit(src).scheme.lower()
    if scheme in ("http", "https"):
        cache = cache_path(cfg, src)
        if cache is not None and cache.is_file():
            return read_local(cache, cfg.max_bytes, src), src
        data = _download(src, cfg)
        if cache is not None:
            _store_in_cache(cache, data)
        return data, src
    if scheme == "data":
        return _data_url(src, cfg.max_bytes), "<data: URL>"
    path = local_path(src, base_dir)
    if path is None:
        raise Reject("unsupported-scheme", f"{src[:200]}: only http, https, file and data URLs and paths are read")
    return read_local(path, cfg.max_bytes, src), src


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
    sha = hashlib.sha256(data).hexdigest()
    try:
        img = decode_image(data, name, cfg)
    except Reject as e:
        e.sha256 = sha  # the bytes were read: a rerun can still tell whether they changed
        raise
    return FetchedImage(img, name, sha, len(data))
