"""A real HTTP server on 127.0.0.1 that serves images and injects the faults a crawl meets.

    /img/<name>         the file <root>/<name>
    /missing.png        404
    /flaky/<name>       500 on the first request of each name, then the file
    /stall.png          headers, then silence past any sane read timeout
    /reset.png          a few bytes, then a TCP reset
    /truncated.png      a PNG cut in half
    /notimage.png       an HTML page served as image/png
    /big.png            more bytes than the test's max_bytes
    /huge.png           a small file that decodes to a huge image
    /trickle.png        headers, then one byte every `trickle_seconds` (never silent for a whole read timeout)

Connections are HTTP/1.1 keep-alive; `connections` counts the TCP connections accepted (reuse shows as 1).
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class FaultServer:
    def __init__(
        self, root: Path, big_bytes: int = 300_000, huge_side: int = 6000, stall_seconds: float = 5.0, trickle_seconds: float = 0.1
    ):
        self.root = root
        self.hits: Counter[str] = Counter()
        self.connections = 0
        self.trickle_seconds = trickle_seconds
        sample = _png(Image.new("RGB", (300, 200), "white"))
        self.truncated = sample[: len(sample) // 2]
        self.big = _png(Image.effect_noise((400, 400), 80).convert("RGB"))[:big_bytes].ljust(big_bytes, b"\0")
        self.huge = _png(Image.new("1", (huge_side, huge_side), 1))
        self.stall_seconds = stall_seconds
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so that a client's connection reuse can be seen

            def setup(self):
                server.connections += 1
                super().setup()

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, body: bytes, ctype: str = "image/png") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path
                server.hits[path] += 1
                if path.startswith("/img/"):
                    f = server.root / path[len("/img/") :]
                    return self._send(200, f.read_bytes()) if f.exists() else self._send(404, b"no")
                if path.startswith("/flaky/"):
                    if server.hits[path] == 1:
                        return self._send(500, b"try again", "text/plain")
                    return self._send(200, (server.root / path[len("/flaky/") :]).read_bytes())
                if path == "/missing.png":
                    return self._send(404, b"not found", "text/plain")
                if path == "/stall.png":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\x89PNG")
                    self.wfile.flush()
                    time.sleep(server.stall_seconds)
                    self.close_connection = True
                    return None
                if path == "/trickle.png":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(100_000):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(server.trickle_seconds)
                    except OSError:  # the client hung up: what the test wants
                        pass
                    self.close_connection = True
                    return None
                if path == "/reset.png":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\x89PNG\r\n")
                    self.wfile.flush()
                    # SO_LINGER with a zero timeout turns close() into a TCP RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return None
                if path == "/truncated.png":
                    return self._send(200, server.truncated)
                if path == "/notimage.png":
                    return self._send(200, b"<html><body>Not an image</body></html>")
                if path == "/big.png":
                    return self._send(200, server.big)
                if path == "/huge.png":
                    return self._send(200, server.huge)
                return self._send(404, b"unknown", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
