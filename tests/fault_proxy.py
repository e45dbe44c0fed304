"""A fault-injecting HTTP proxy on 127.0.0.1 for the served engine's tests: it forwards to an
upstream server and, by the number of each request, fails it the ways servers and networks do.

    with FaultProxy("http://127.0.0.1:8000") as proxy:   # proxy.url: http://127.0.0.1:PORT
        ...

Of the requests to /v1/completions, every 4th is dropped (the connection closed unanswered),
every 5th answered 503 with Retry-After: 1, every 6th delayed 0.3 s, and every 7th forwarded
with its body cut short; the faults are counted in `faults`. Other paths pass through.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.count = 0
        self.faults: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self.forward(None)

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def forward(self, body):
                fault = proxy.fault(self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "delay":
                    threading.Event().wait(0.3)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=600)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                conn.close()
                self.send_response(response.status)
                self.send_header("Content-Type", response.getheader("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fault(self, path: str) -> str | None:
        if not path.startswith("/v1/completions"):
            return None
        with self.lock:
            self.count += 1
            n = self.count
        for every, fault in ((4, "drop"), (5, "503"), (6, "delay"), (7, "cut")):
            if n % every == 0:
                with self.lock:
                    self.faults[fault] += 1
                return fault
        return None

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
