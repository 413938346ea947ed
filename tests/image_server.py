"""A local HTTP server (127.0.0.1 only) that serves test images, redirects, errors and slow replies.

Tests never make the service fetch from anywhere else.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import io
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from PIL import Image


def image_bytes(size=(64, 48), mode="RGB", fmt="PNG", color=None, **save_args) -> bytes:
    """A synthetic image with structure (gradients, a block): more for an encoder than a flat colour."""
    width, height = size
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    if color is not None:
        image.paste(color, (width // 4, height // 4, max(width // 2, 1), max(height // 2, 1)))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def gzipped_zeros(size: int) -> bytes:
    """`size` zero bytes, gzipped a MiB at a time (the zeros never sit in memory at once)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    body = b"".join(
        compressor.compress(zeros[: min(len(zeros), size - done)]) for done in range(0, size, len(zeros))
    )
    return body + compressor.flush()


@functools.lru_cache(maxsize=4)
def stacked_gzip(layers: int, size: int) -> bytes:
    """`size` zero bytes gzipped `layers` times (made once: a GiB takes seconds to compress)."""
    body = gzipped_zeros(size)
    for _ in range(layers - 1):
        body = gzip.compress(body)
    return body


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class ImageServer:
    """Serves registered bodies under /files/NAME, plus:

    /redirect/N/NAME   N redirects, then /files/NAME
    /status/CODE       an empty reply with that status
    /slow/SECONDS      waits, then a PNG
    /stream/BYTES      a chunked body of that size with no Content-Length
    /gzip/LAYERS/BYTES that many zero bytes gzipped LAYERS times, sent as Content-Encoding: gzip, gzip...
    """

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                # A query string only makes a URL unique (no cache in between matches it).
                parts = urlsplit(self.path).path.strip("/").split("/")
                if parts[0] == "files" and parts[1] in server.files:
                    body, content_type = server.files[parts[1]]
                    self._reply(200, body, content_type)
                elif parts[0] == "redirect":
                    remaining = int(parts[1])
                    target = (
                        f"/redirect/{remaining - 1}/{parts[2]}" if remaining > 1 else f"/files/{parts[2]}"
                    )
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif parts[0] == "status":
                    self._reply(int(parts[1]), b"", "text/plain")
                elif parts[0] == "slow":
                    time.sleep(min(float(parts[1]), 10.0))
                    self._reply(200, image_bytes(), "image/png")
                elif parts[0] == "stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    remaining = int(parts[1])
                    try:
                        while remaining > 0:
                            piece = b"\0" * min(65536, remaining)
                            self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                            remaining -= len(piece)
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                elif parts[0] == "gzip":
                    layers, size = int(parts[1]), int(parts[2])
                    body = stacked_gzip(layers, size)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Encoding", ", ".join(["gzip"] * layers))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self.wfile.write(body)
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def add(self, name: str, body: bytes, content_type: str = "image/png") -> str:
        self.files[name] = (body, content_type)
        return f"{self.base_url}/files/{name}"

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
