"""A real HTTP proxy on loopback, for tests that must see or disturb the traffic between a
client and a sandbox server (never a mock: it forwards over real sockets)."""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class CountingProxy:
    """Forwards every request to ``target`` and counts them by method and path."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target_host, self.target_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.counts: collections.Counter[str] = collections.Counter()
        #: Bytes added to the body of every GET of ``files/``: a server sending more than
        #: its HEAD announced (its Content-Length tells the truth about what is sent).
        self.inflate = 0
        #: Seconds to wait before forwarding a request whose path starts with the key (a slow
        #: ``libraries/`` or ``usages/``, as on the public server).
        self.delays: dict[str, float] = {}
        #: When set, ``specifications/`` is answered with this body instead of the server's,
        #: and anything the server offers beyond the PremierLangage protocol (the
        #: ``execute/stream/`` WebSocket) is answered 404, as a PremierLangage server does.
        self.premierlangage_specifications: dict[str, object] | None = None
        #: When set, the proxy hides the ``causes`` extension as a server without it would:
        #: ``cause`` and ``signal`` leave every ``execution`` entry of an ``execute/``
        #: answer, and ``causes`` leaves the ``extensions`` of a forwarded
        #: ``specifications/``.
        self.strip_causes = False
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.counts[f"{self.command} {self.path}"] += 1
                    delay = max(
                        (s for p, s in proxy.delays.items() if self.path.startswith(p)), default=0
                    )
                time.sleep(delay)
                if proxy.premierlangage_specifications is not None and self._premierlangage():
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.target_port}"
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                if self.command == "GET" and self.path.startswith("/files/"):
                    data += b"x" * proxy.inflate
                if proxy.strip_causes and answer.status == 200:
                    data = _without_causes(self.path, data)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD answer has no body, but announces the size of the GET's.
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            def _premierlangage(self) -> bool:
                """Answer as a PremierLangage server would where ours differs; False when the
                request is to be forwarded."""
                if self.path == "/specifications/":
                    status, body = 200, json.dumps(proxy.premierlangage_specifications).encode()
                    kind = "application/json"
                elif self.path.startswith("/execute/stream/"):
                    status, body, kind = 404, b"Not Found", "text/html"
                else:
                    return False
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return True

            do_GET = do_POST = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self.counts[f"{method} /{path}"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _without_causes(path: str, data: bytes) -> bytes:
    """``data`` (an answer to ``path``) as a server without the ``causes`` extension would
    send it; anything that is not such an answer is left as it came."""
    if path not in ("/execute/", "/specifications/"):
        return data
    try:
        answer = json.loads(data)
    except ValueError:
        return data
    if not isinstance(answer, dict):
        return data
    if path == "/specifications/" and isinstance(answer.get("extensions"), list):
        answer["extensions"] = [name for name in answer["extensions"] if name != "causes"]
    for entry in answer.get("execution") or []:
        if isinstance(entry, dict):
            entry.pop("cause", None)
            entry.pop("signal", None)
    return json.dumps(answer).encode()
