"""``python -m ser_lightning serve``: a model over HTTP and WebSocket, with a web page (FastAPI + uvicorn).

- ``POST /v1/predict``: a recording (raw body, or multipart with a ``file`` field) in any format the decoder
  reads -> the same JSON object as ``predict --output x.json`` gives for a file (emotion, probabilities,
  duration, the window timeline).
- ``WS /v1/stream``: the client sends ``{"type": "start", "sample_rate": 16000, "format": "f32"|"s16",
  "channels": 1}`` (optional: ``window_seconds``, ``hop_seconds``, ``attention``, ``min_confidence``), then
  binary frames of little-endian samples (interleaved channels), and ``{"type": "stop"}`` at the end; it
  receives ``{"type": "ready", ...}``, then ``{"type": "event", ...}`` per window as it becomes ready
  (``StreamEvent.to_json``), and ``{"type": "end"}``. Errors come as ``{"type": "error", "status": 4xx,
  "error": "..."}``; a malformed control message is reported and the stream goes on.
- ``GET /v1/model`` (classes, features, window settings, checkpoint SHA-256s, limits), ``GET /healthz``,
  ``GET /`` (the web page: live microphone and dropped files).

Inference never runs on the event loop: decoding and features of requests run in a thread pool; one thread
(``StreamWorker``) prepares the windows of every stream, taking the streams that became due together (their voice
activity, frames and functionals in a few large operations); and one thread (``Batcher``) runs the model on the
windows of all requests and streams together (up to ``max_batch`` windows, waiting at most ``max_wait_ms`` for
more). A stream's small frames only wait (cheaply, on the event loop) until a window or enough audio is complete.
Limits (upload bytes, recording duration, concurrent streams, idle streams) are options; every bad input gets a
4xx JSON error and the server goes on serving everyone else. It binds 127.0.0.1 unless told otherwise; any other address needs
``--token`` (clients send ``Authorization: Bearer TOKEN``; WebSocket clients may pass ``?token=TOKEN``,
which is what the web page does) or an explicit ``--insecure``. Checkpoints are read with the safe
loader; nothing from a request touches the file system by name.
"""

import argparse
import asyncio
import gc
import hashlib
import io
import ipaddress
import json
import math
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from ser_lightning.inference.stream import classify_jobs, prepare_streams

_timeout = getattr(asyncio, "timeout", None)
SAMPLE_FORMATS = {"f32": "<f4", "float32": "<f4", "s16": "<i2", "int16": "<i2"}
REQUEST_THREADS = 4
"""Threads for requests' decoding and features at least (more with a larger batch: each holds its thread while the
model thread answers)."""
WEB = files("ser_lightning.inference") / "web"


class RequestError(Exception):
    """A client's mistake: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeSettings:
    """The server's options, checked once here."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    insecure: bool = False
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 50 * 1024 * 1024
    max_duration_s: float = 600.0
    max_streams: int = 64
    idle_timeout_s: float = 30.0
    window_seconds: float = 2.0
    hop_seconds: float = 0.5
    max_stream_s: float = 4 * 3600.0  # a live stream's state does not grow with its age: the limit is the operator's

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.port <= 65535 or self.port == 0, f"--port: {self.port} is not a TCP port"),
            (self.max_batch >= 1, f"--max_batch must be >= 1, got {self.max_batch}"),
            (self.max_wait_ms >= 0, f"--max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.max_upload_bytes >= 1, f"--max_upload_mb must be positive, got {self.max_upload_bytes} bytes"),
            (self.max_duration_s > 0, f"--max_duration_s must be > 0, got {self.max_duration_s}"),
            (self.max_stream_s > 0, f"--max_stream_s must be > 0, got {self.max_stream_s}"),
            (self.max_streams >= 1, f"--max_streams must be >= 1, got {self.max_streams}"),
            (self.idle_timeout_s > 0, f"--idle_timeout_s must be > 0, got {self.idle_timeout_s}"),
            (self.window_seconds > 0, f"--window_seconds must be > 0, got {self.window_seconds}"),
            (0 < self.hop_seconds <= self.window_seconds,
             f"--hop_seconds must be in (0, --window_seconds], got {self.hop_seconds}"),
            (self.token is None or len(self.token) >= 8, "--token: use at least 8 characters"),
            (is_loopback(self.host) or self.token is not None or self.insecure,
             f"--host {self.host}: serving beyond this machine needs --token (or, knowingly, --insecure)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class QueueThread:
    """A daemon thread that takes its queue's items in groups: the first, then whatever else arrives within
    ``wait_s`` while the group's size (``size`` of each item) is below ``limit``; ``_serve(items, size)`` handles a
    group; None on the queue ends the thread."""

    def __init__(self, name: str, wait_s: float = 0.0, limit: float = math.inf) -> None:
        self.wait_s, self.limit = wait_s, limit
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def size(self, item: Any) -> int:
        return 1

    def _serve(self, items: list, size: int) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            items, size = [item], self.size(item)
            deadline = time.monotonic() + self.wait_s
            while size < self.limit:
                try:  # a timeout of 0: only what is queued already
                    more = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                items.append(more)
                size += self.size(more)
            self._serve(items, size)


class Batcher(QueueThread):
    """One thread that runs the model: the windows of every request and stream, ``max_batch`` at a time.

    ``classify`` (the recognizer's ``classifier``) is called from worker threads and blocks until its windows
    are done. A batch that fails is retried request by request, so one client's bad window fails only its own
    request.
    """

    def __init__(self, max_batch: int, max_wait_ms: float) -> None:
        self.batches: list[int] = []  # windows per model batch (recent), for the benchmark
        super().__init__("ser-batcher", max_wait_ms / 1000, max_batch)

    def size(self, item: Any) -> int:
        return len(item[1])

    def submit(self, recognizer: Any, jobs: list, future: Future | None = None) -> Future:
        """Queue the jobs for the model thread; ``future`` (a new one by default) gets their events (at once when none
        needs the model)."""
        future = Future() if future is None else future
        if not any(job.needs_model for job in jobs):
            future.set_result([job.event for job in jobs])
        else:
            self.queue.put((recognizer, jobs, future))
        return future

    def classify(self, recognizer: Any, jobs: list) -> list:
        """The jobs' events, blocking this (worker) thread until the model thread has run them."""
        return self.submit(recognizer, jobs).result()

    async def classify_async(self, recognizer: Any, jobs: list) -> list:
        """The same without holding a thread: the event loop awaits the model thread's answer."""
        return await asyncio.wrap_future(self.submit(recognizer, jobs))

    def _serve(self, items: list, windows: int) -> None:
        items = [item for item in items if _claim(item[2])]  # a client gone away cancelled its future: no work
        if not items:
            return
        recognizer = items[0][0]
        self.batches = (self.batches + [windows])[-1000:]
        try:
            classify_jobs(recognizer, [job for _, jobs, _ in items for job in jobs])
        except Exception:  # noqa: BLE001 - find whose window it was: each request alone
            for _, jobs, future in items:
                try:
                    future.set_result(classify_jobs(recognizer, jobs))
                except Exception as error:  # noqa: BLE001
                    future.set_exception(error)
            return
        for _, jobs, future in items:
            future.set_result([job.event for job in jobs])


def _claim(future: Future) -> bool:
    """Mark a future running before its work (its waiter can no longer cancel it, so setting its result cannot fail);
    False when it was cancelled already (a client that went away)."""
    return future.running() or future.set_running_or_notify_cancel()


class StreamWorker(QueueThread):
    """One thread that prepares the windows of every stream (``prepare_streams``): the streams that became due while
    it worked are taken together, so that their voice activity, new frames, window edges and functionals are a few
    large operations instead of many small ones (fewer, larger calls: less interpreter time, less contention for the
    GIL); their windows then go to the ``Batcher``. A stream has at most one item queued (its handler awaits it)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        super().__init__("ser-streams")  # no waiting for more: a busy worker gathers by itself

    async def events(self, recognizer: Any, stream: Any, samples: Any) -> list:
        """The events of the windows that ``samples`` complete (None: the end of the stream), awaited by the event
        loop; a ValueError for samples the stream refuses."""
        future: Future = Future()
        self.queue.put((recognizer, stream, samples, future))
        return await asyncio.wrap_future(future)

    def _serve(self, items: list, size: int) -> None:
        items = [item for item in items if _claim(item[3])]  # a stream whose client went away: nothing to do
        if not items:
            return
        try:
            results = prepare_streams([(stream, samples) for _, stream, samples, _ in items])
        except Exception as error:  # noqa: BLE001 - not the client's fault: every stream waiting learns of it
            for *_, future in items:
                future.set_exception(error)
            return
        for (recognizer, _, _, future), result in zip(items, results):
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                self.batcher.submit(recognizer, result, future)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_info(recognizer: Any, settings: ServeSettings, checkpoints: list[dict]) -> dict:
    from ser_lightning.inference.stream import default_vad

    hparams = recognizer.module.hparams
    return {
        "classes": recognizer.class_names,
        "arch": recognizer.arch,
        "normalization": hparams["normalization"],
        "features": asdict(recognizer.feature),
        "sample_rate": recognizer.sample_rate,
        "min_input_seconds": recognizer.module.model.min_input_frames * recognizer.extractor.hop_seconds,
        "predict": {"window_seconds": recognizer.window_seconds, "hop_seconds": recognizer.hop_seconds},
        "stream": {"window_seconds": settings.window_seconds, "hop_seconds": settings.hop_seconds,
                   "formats": sorted(SAMPLE_FORMATS), "vad": default_vad()},
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_duration_s": settings.max_duration_s,
                   "max_stream_s": settings.max_stream_s,
                   "max_streams": settings.max_streams, "idle_timeout_s": settings.idle_timeout_s},
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
        "checkpoints": checkpoints,
    }


def predict_bytes(recognizer: Any, data: bytes, name: str, settings: ServeSettings,
                  min_confidence: float | None) -> dict:
    """The ``predict --output x.json`` object of one uploaded recording (read from memory only)."""
    from ser_lightning.data.audio import AudioError, audio_duration, decode
    from ser_lightning.inference.commands import FileResult, json_records

    source = io.BytesIO(data)
    source.name = name
    try:
        duration = audio_duration(source)
    except AudioError as error:
        raise RequestError(415, f"not audio the decoder reads ({error})") from None
    if duration > settings.max_duration_s:
        raise RequestError(413, f"the recording lasts {duration:.1f} s; the limit is {settings.max_duration_s:g} s")
    try:
        recording = decode(source)  # once: its statistics and its prediction read it from memory
        prediction = recognizer.predict_with_own_statistics(recording, min_confidence=min_confidence)
    except AudioError as error:
        raise RequestError(422, str(error)) from None
    except ValueError as error:
        raise RequestError(422, f"{name}: {error}") from None
    record = json_records([FileResult(name, prediction)])[0]
    if recognizer.needs_speaker_stats:
        record["note"] = "; ".join(filter(None, [record["note"], "speaker statistics from this recording alone"]))
    return record


def create_app(recognizer: Any, settings: ServeSettings, checkpoints: list[dict] | None = None) -> Any:
    """The FastAPI application serving ``recognizer`` (no globals: tests build one per model)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import FileResponse, JSONResponse

    state = {"streams": 0}
    # requests hold their thread while the model thread answers, so they have up to the batch size
    requests = ThreadPoolExecutor(max_workers=max(REQUEST_THREADS, settings.max_batch), thread_name_prefix="ser-request")
    info = model_info(recognizer, settings, checkpoints or [])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(settings.max_batch, settings.max_wait_ms)
        recognizer.batch_size = max(recognizer.batch_size, settings.max_batch)
        recognizer.classifier = lambda rec, jobs: batcher.classify(rec, jobs)
        app.state.batcher, app.state.streams = batcher, StreamWorker(batcher)
        try:
            yield
        finally:
            recognizer.classifier = classify_jobs
            app.state.streams.close()
            batcher.close()
            requests.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ser-lightning", lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorised(header: str | None, query_token: str | None) -> bool:
        if settings.token is None:
            return True
        given = query_token or (header[7:] if header and header.lower().startswith("bearer ") else "")
        return secrets.compare_digest(given.encode(), settings.token.encode())

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"status": "error", "error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/") and not authorised(request.headers.get("authorization"),
                                                                   request.query_params.get("token")):
            return error(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        try:
            return await call_next(request)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - never crash: the client learns what failed
            return error(500, f"internal error ({type(exc).__name__}: {exc})")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "streams": state["streams"]}

    @app.get("/v1/model")
    async def model() -> dict:
        return info

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        min_confidence = _confidence(request.query_params.get("min_confidence"))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            raise RequestError(413, f"the upload has {declared} bytes; the limit is {settings.max_upload_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_upload_bytes:
                raise RequestError(413, f"the upload exceeds the limit of {settings.max_upload_bytes} bytes")
        data, name = bytes(body), "upload"
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            data, name = await _multipart_file(request, data)
        if not data:
            raise RequestError(400, "empty body: send the recording as the request body or as a multipart 'file'")
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(requests, predict_bytes, recognizer, data, name, settings, min_confidence)
        return JSONResponse(record)

    @app.websocket("/v1/stream")
    async def stream(socket: WebSocket) -> None:
        await socket.accept()
        if not authorised(socket.headers.get("authorization"), socket.query_params.get("token")):
            await _fail(socket, 401, "missing or wrong token (Authorization: Bearer TOKEN, or ?token=TOKEN)", 1008)
            return
        if state["streams"] >= settings.max_streams:
            await _fail(socket, 503, f"the server holds its limit of {settings.max_streams} streams; try again later",
                        1013)
            return
        state["streams"] += 1
        try:
            await _serve_stream(socket, recognizer, settings, app.state.streams)
        except WebSocketDisconnect:
            pass
        finally:
            state["streams"] -= 1

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(str(WEB / "index.html"), media_type="text/html")

    @app.get("/web/{name}")
    async def web(name: str) -> Any:
        types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        resource = WEB / name
        if "/" in name or name.startswith(".") or Path(name).suffix not in types or not resource.is_file():
            return error(404, f"no such page file: {name}")
        return FileResponse(str(resource), media_type=types[Path(name).suffix])

    return app


def _confidence(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise RequestError(400, f"min_confidence: expected a number in [0, 1], got {value!r}") from None
    if not 0 <= number <= 1:
        raise RequestError(400, f"min_confidence: expected a number in [0, 1], got {value!r}")
    return number


async def _multipart_file(request: Any, body: bytes) -> tuple[bytes, str]:
    """The ``file`` part of a multipart body (already read, within the size limit)."""
    request._body = body  # the form parser reads the body from here instead of the (consumed) stream
    try:
        form = await request.form()
    except Exception as exc:  # noqa: BLE001 - any malformed multipart body
        raise RequestError(400, f"malformed multipart body ({exc})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise RequestError(400, "multipart body without a 'file' field")
    return await upload.read(), Path(upload.filename or "upload").name


async def _send(socket: Any, message: dict) -> None:
    await socket.send_text(json.dumps(message))


async def _fail(socket: Any, status: int, message: str, code: int = 1008) -> None:
    await _send(socket, {"type": "error", "status": status, "error": message})
    await socket.close(code=code)


def _start_options(text: str, settings: ServeSettings) -> dict:
    """The validated ``start`` message of a stream."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON ({exc.msg})") from None
    if not isinstance(message, dict) or message.get("type") != "start":
        raise RequestError(400, 'the first message must be {"type": "start", "sample_rate": ..., "format": ...}')
    fmt = message.get("format", "f32")
    rate, channels = message.get("sample_rate"), message.get("channels", 1)
    if fmt not in SAMPLE_FORMATS:
        raise RequestError(400, f"format: unknown sample format {fmt!r}; use one of {sorted(SAMPLE_FORMATS)}")
    if not isinstance(rate, int) or not 1000 <= rate <= 384000:
        raise RequestError(400, f"sample_rate: expected an integer in 1000..384000 Hz, got {rate!r}")
    if not isinstance(channels, int) or not 1 <= channels <= 32:
        raise RequestError(400, f"channels: expected an integer in 1..32, got {channels!r}")
    options = {"sample_rate": rate, "format": SAMPLE_FORMATS[fmt], "channels": channels,
               "window_seconds": message.get("window_seconds", settings.window_seconds),
               "hop_seconds": message.get("hop_seconds", settings.hop_seconds),
               "attention": bool(message.get("attention", False)),
               "min_confidence": message.get("min_confidence")}
    for key in ("window_seconds", "hop_seconds"):
        if not isinstance(options[key], (int, float)) or not 0 < options[key] <= 30:
            raise RequestError(400, f"{key}: expected a number of seconds in (0, 30], got {options[key]!r}")
    if options["min_confidence"] is not None:
        options["min_confidence"] = _confidence(str(options["min_confidence"]))
    return options


async def _serve_stream(socket: Any, recognizer: Any, settings: ServeSettings, worker: StreamWorker) -> None:
    async def receive() -> dict | None:
        try:
            if _timeout is None:  # Python 3.10
                return await asyncio.wait_for(socket.receive(), settings.idle_timeout_s)
            async with _timeout(settings.idle_timeout_s):  # a timer, not a task per message as wait_for makes
                return await socket.receive()
        except asyncio.TimeoutError:
            await _fail(socket, 408, f"no data for {settings.idle_timeout_s:g} s: the stream is closed", 1001)
            return None

    message = await receive()
    if message is None or message.get("type") == "websocket.disconnect":
        return
    try:
        if message.get("text") is None:
            raise RequestError(400, 'the first message must be a JSON text message {"type": "start", ...}')
        options = _start_options(message["text"], settings)
        stream = recognizer.stream(options["sample_rate"], options["window_seconds"], options["hop_seconds"],
                                   channels=options["channels"], attention=options["attention"],
                                   min_confidence=options["min_confidence"])
    except RequestError as exc:
        await _fail(socket, exc.status, str(exc))
        return
    except ValueError as exc:
        await _fail(socket, 400, str(exc))
        return
    await _send(socket, {"type": "ready", "classes": recognizer.class_names, "sample_rate": options["sample_rate"],
                         "window_seconds": options["window_seconds"], "hop_seconds": options["hop_seconds"],
                         "incremental": stream.incremental})
    dtype, channels = np.dtype(options["format"]), options["channels"]
    limit = settings.max_stream_s * options["sample_rate"]
    while True:
        message = await receive()
        if message is None or message.get("type") == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            data = message["bytes"]
            if len(data) % (dtype.itemsize * channels):
                await _send(socket, {"type": "error", "status": 400, "error": f"a binary frame of {len(data)} bytes is "
                                     f"not a whole number of {channels}-channel {options['format']} samples"})
                continue
            if stream.received + stream.pending_count + len(data) // (dtype.itemsize * channels) > limit:
                await _fail(socket, 413, f"the stream exceeds the limit of {settings.max_stream_s:g} s (--max_stream_s)",
                            1009)
                return
            samples = np.frombuffer(data, dtype=dtype)
            if channels > 1:
                samples = samples.reshape(-1, channels)
            try:
                if not stream.due(len(samples)):
                    stream.prepare(samples)  # it only waits for more: no thread needed
                    continue
                events = await worker.events(recognizer, stream, samples)
            except ValueError as exc:
                await _send(socket, {"type": "error", "status": 422, "error": str(exc)})
                continue
            for event in events:
                await _send(socket, {"type": "event", **event.to_json()})
            continue
        try:
            control = json.loads(message.get("text") or "")
        except json.JSONDecodeError as exc:
            await _send(socket, {"type": "error", "status": 400, "error": f"malformed JSON control message ({exc.msg})"})
            continue
        if not isinstance(control, dict) or control.get("type") != "stop":
            await _send(socket, {"type": "error", "status": 400,
                                 "error": 'unknown control message; send binary audio frames or {"type": "stop"}'})
            continue
        for event in await worker.events(recognizer, stream, None):
            await _send(socket, {"type": "event", **event.to_json()})
        await _send(socket, {"type": "end"})
        await socket.close()
        return


def serve_main(argv: list[str]) -> None:
    """Serve a trained model over HTTP and WebSocket, with a web page for the microphone and files."""
    from ser_lightning.inference.recognizer import EmotionRecognizer

    parser = argparse.ArgumentParser(prog="python -m ser_lightning serve", description=serve_main.__doc__)
    parser.add_argument("--ckpt_path", required=True, type=Path, action="append",
                        help="checkpoint; several: one seed ensemble (their probabilities averaged)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="load a checkpoint that needs more than the safe loader allows (only files you trust)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="required from clients (Authorization: Bearer TOKEN; needed to bind beyond "
                                        "this machine)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --token")
    parser.add_argument("--max_batch", type=int, default=32, help="windows per model call (default 32; 1: no batching)")
    parser.add_argument("--max_wait_ms", type=float, default=5.0, help="longest wait for a batch to fill (default 5)")
    parser.add_argument("--max_upload_mb", type=float, default=50.0, help="largest upload (default 50 MB)")
    parser.add_argument("--max_duration_s", type=float, default=600.0, help="longest uploaded recording (default 600)")
    parser.add_argument("--max_stream_s", type=float, default=4 * 3600.0,
                        help="longest live stream (default 14400: 4 hours; a stream's memory does not grow with time)")
    parser.add_argument("--max_streams", type=int, default=64, help="concurrent streams (default 64)")
    parser.add_argument("--idle_timeout_s", type=float, default=30.0, help="close a stream silent this long (default 30)")
    parser.add_argument("--window_seconds", type=float, default=2.0, help="stream window (default 2)")
    parser.add_argument("--hop_seconds", type=float, default=0.5, help="stream hop (default 0.5)")
    parser.add_argument("--predict_window_seconds", type=float, default=4.0,
                        help="uploads longer than this are classified in windows, as by `predict` (default 4)")
    args = parser.parse_args(argv)
    from ser_lightning.runtime import keep_freed_memory

    keep_freed_memory()  # a long-running process allocating the same tensors again and again: no fresh pages each time
    settings = ServeSettings(args.host, args.port, args.token, args.insecure, args.max_batch, args.max_wait_ms,
                             int(args.max_upload_mb * 1024 * 1024), args.max_duration_s, args.max_streams,
                             args.idle_timeout_s, args.window_seconds, args.hop_seconds, args.max_stream_s)
    recognizer = EmotionRecognizer.from_checkpoint(args.ckpt_path, device=args.device, trusted=args.trust_checkpoint,
                                                   window_seconds=args.predict_window_seconds)
    checkpoints = [{"file": path.name, "sha256": sha256(path)} for path in args.ckpt_path]
    import uvicorn

    app = create_app(recognizer, settings, checkpoints)
    # what is loaded now lives as long as the server: out of the collector's sight, so that a full collection (every
    # few thousand windows or requests) scans what the requests left instead of torch and the model (200+ ms held
    # with the GIL: every stream late at once)
    gc.collect()
    gc.freeze()
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"serving {', '.join(p.name for p in args.ckpt_path)} on http://{shown}:{settings.port}/ "
          f"(page at /, API at /v1/predict, /v1/stream, /v1/model)", flush=True)
    # no per-message compression: audio hardly compresses, and inflating every small frame costs the event loop
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", ws_max_size=16 * 1024 * 1024,
                ws_per_message_deflate=False)
