"""The app of ``serve`` on 127.0.0.1 and a free port (uvicorn in a thread): for tests that need a real server."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serving(recognizer, **settings) -> Iterator[str]:
    """Serve ``create_app(recognizer, ServeSettings(**settings))``; yields its base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    from ser_lightning.inference.serve import ServeSettings, create_app

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    app = create_app(recognizer, ServeSettings(port=port, **settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_max_size=16 * 1024 * 1024))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
