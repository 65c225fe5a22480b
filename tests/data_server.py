"""A throwaway HTTP server on 127.0.0.1 for the download tests.

``serve(routes)`` runs it in a thread; ``routes`` maps a URL path to the bytes to send, or to
a misbehaviour: ``Drop(body)`` sends the headers of the whole body, then half of it, then
closes the connection; ``Stall(seconds)`` waits before answering. Other paths get 404. The
server records every path requested, in order, in ``server.requests``.
"""
from __future__ import annotations

import contextlib
import http.server
import threading
import time
from dataclasses import dataclass


@dataclass
class Drop:
    body: bytes


@dataclass
class Stall:
    seconds: float


@contextlib.contextmanager
def serve(routes: dict):
    """Yield (base_url, server): base_url + "a/" is a mirror when routes hold "/a/<file>"."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            server.requests.append(self.path)
            answer = routes.get(self.path)
            if isinstance(answer, Stall):
                time.sleep(answer.seconds)
                answer = None
            if answer is None:
                self.send_error(404)
                return
            body = answer.body if isinstance(answer, Drop) else answer
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if isinstance(answer, Drop):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True  # a stalled handler must not hold up the shutdown

        def handle_error(self, request, client_address):
            pass  # a client that gave up on a stall or a drop is expected, not news

    server = Server(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
