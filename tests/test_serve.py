"""The server: REST predict equals the Python API, the WebSocket stream equals the offline stream, every bad input
gets its 4xx while the server goes on, limits hold, and a mixed load leaves it answering and not growing."""
from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_lightning import EmotionRecognizer
from ser_lightning.inference.serve import ServeSettings, create_app

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def recognizer(seed1d_checkpoint) -> EmotionRecognizer:
    return EmotionRecognizer.from_checkpoint(seed1d_checkpoint.parent / "last.ckpt")


@pytest.fixture(scope="module")
def audio(tiny_corpus) -> dict[str, bytes | np.ndarray]:
    files = sorted(tiny_corpus.rglob("*.wav"))
    wave = np.concatenate([sf.read(files[k], dtype="float32")[0] for k in (0, 40, 90)])
    buffer = io.BytesIO()
    sf.write(buffer, wave, 16000, format="WAV", subtype="PCM_16")
    return {"short": files[3].read_bytes(), "short_path": files[3], "long": buffer.getvalue(), "wave": wave}


def client_for(recognizer, **settings) -> TestClient:
    return TestClient(create_app(recognizer, ServeSettings(**settings)))


@pytest.mark.parametrize("kind", ["short", "long"])
@pytest.mark.parametrize("encoding", ["raw", "multipart"])
def test_predict_equals_predict_file(recognizer, audio, tmp_path, kind, encoding):
    path = tmp_path / f"{kind}.wav"
    path.write_bytes(audio[kind])
    expected = recognizer.predict_file(path)
    with client_for(recognizer) as client:
        if encoding == "raw":
            response = client.post("/v1/predict", content=audio[kind], headers={"content-type": "audio/wav"})
        else:
            response = client.post("/v1/predict", files={"file": (f"{kind}.wav", audio[kind], "audio/wav")})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["emotion"] == expected.label
    assert record["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    assert record["duration_s"] == pytest.approx(expected.duration)
    assert [w["emotion"] for w in record["windows"]] == [w.label for w in expected.windows]
    assert (len(record["windows"]) > 0) == (kind == "long")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_REQUESTS = [
    ("empty body", {"content": b""}, 400, "empty body"),
    ("not audio", {"content": b"this is not audio at all" * 10}, 415, "not audio"),
    ("truncated file", {"content": "TRUNCATED"}, 422, "truncated"),
    ("multipart without file", {"files": {"other": ("a.txt", b"x", "text/plain")}}, 400, "'file'"),
    ("bad min_confidence", {"content": "SHORT", "params": {"min_confidence": "lots"}}, 400, "min_confidence"),
    ("upload too large", {"content": "HUGE"}, 413, "limit"),
    ("recording too long", {"content": "LONG"}, 413, "limit"),
]


@pytest.mark.parametrize("name, request_kwargs, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_every_bad_request_gets_its_4xx_and_the_next_good_one_succeeds(recognizer, audio, name, request_kwargs,
                                                                       status, words):
    kwargs = dict(request_kwargs)
    if kwargs.get("content") == "TRUNCATED":
        kwargs["content"] = _truncated(audio["short"])
    elif kwargs.get("content") in ("SHORT", "LONG"):
        kwargs["content"] = audio[kwargs["content"].lower()]
    elif kwargs.get("content") == "HUGE":
        kwargs["content"] = audio["short"] + b"\0" * 1000
    limits = {"max_upload_bytes": len(audio["short"]) + 10} if name == "upload too large" else {}
    limits |= {"max_duration_s": 5.0} if name == "recording too long" else {}
    with client_for(recognizer, **limits) as client:
        response = client.post("/v1/predict", **kwargs)
        assert response.status_code == status, response.text
        assert words in response.json()["error"]
        good = client.post("/v1/predict", content=audio["short"])
        assert good.status_code == 200 and good.json()["status"] == "ok"


def test_tokens_are_required_beyond_this_machine_and_checked(recognizer, audio):
    with pytest.raises(ValueError, match="--token"):
        ServeSettings(host="0.0.0.0")
    assert ServeSettings(host="0.0.0.0", insecure=True).insecure
    with client_for(recognizer, token=TOKEN) as client:
        assert client.post("/v1/predict", content=audio["short"]).status_code == 401
        wrong = {"authorization": "Bearer nope-nope-nope"}
        assert client.post("/v1/predict", content=audio["short"], headers=wrong).status_code == 401
        right = {"authorization": f"Bearer {TOKEN}"}
        assert client.post("/v1/predict", content=audio["short"], headers=right).status_code == 200
        assert client.get("/healthz").status_code == 200  # health needs no token
        with client.websocket_connect("/v1/stream") as socket:
            assert socket.receive_json()["status"] == 401
        with client.websocket_connect(f"/v1/stream?token={TOKEN}") as socket:
            socket.send_text(json.dumps({"type": "start", "sample_rate": 16000}))
            assert socket.receive_json()["type"] == "ready"


def test_model_info_names_classes_windows_and_checkpoint_hashes(recognizer):
    app = create_app(recognizer, ServeSettings(), [{"file": "a.ckpt", "sha256": "ab" * 32}])
    with TestClient(app) as client:
        info = client.get("/v1/model").json()
    assert info["classes"] == recognizer.class_names
    assert info["stream"]["window_seconds"] == 2.0 and info["stream"]["hop_seconds"] == 0.5
    assert info["checkpoints"][0]["sha256"] == "ab" * 32 and info["sample_rate"] == 16000


def stream_events(socket, samples: np.ndarray, rng: np.random.Generator, fmt: str = "f32") -> list[dict]:
    socket.send_text(json.dumps({"type": "start", "sample_rate": 16000, "format": fmt}))
    assert socket.receive_json()["type"] == "ready"
    position = 0
    while position < len(samples):
        step = int(rng.integers(1, 9000))
        part = samples[position : position + step]
        data = part.astype("<f4") if fmt == "f32" else np.round(part * 32767).astype("<i2")
        socket.send_bytes(data.tobytes())
        position += step
    socket.send_text(json.dumps({"type": "stop"}))
    events = []
    while (message := socket.receive_json())["type"] != "end":
        assert message["type"] == "event", message
        events.append(message)
    return events


def test_websocket_stream_in_random_frames_yields_the_offline_events(recognizer, audio):
    wave = audio["wave"]
    offline = recognizer.stream(16000)
    expected = offline.push(wave) + offline.close()
    with client_for(recognizer) as client, client.websocket_connect("/v1/stream") as socket:
        events = stream_events(socket, wave, np.random.default_rng(1))
    assert [(e["start_s"], e["end_s"], e["speech"], e["emotion"]) for e in events] == [
        (pytest.approx(e.start_s), pytest.approx(e.end_s), e.speech, e.emotion) for e in expected]
    for got, want in zip(events, expected):
        if want.probabilities is not None:
            assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)


def test_the_documented_python_client_streams_a_file_through_a_real_server(recognizer, audio, tmp_path, capsys):
    """The client in docs/live.md ("From another program"), run as written against uvicorn with a token: its events
    are the offline stream's."""
    from live_server import serving

    text = (Path(__file__).resolve().parents[1] / "docs" / "live.md").read_text()
    code = re.search(r"### From another program\n.*?```python\n(.*?)```", text, re.DOTALL).group(1)
    path = tmp_path / "clip.wav"
    sf.write(path, audio["wave"], 16000, subtype="FLOAT")
    offline = recognizer.stream(16000)
    expected = offline.push(audio["wave"]) + offline.close()
    with serving(recognizer, token=TOKEN) as url:
        setting = f"URL, FILE, TOKEN = {url.replace('http', 'ws') + '/v1/stream'!r}, {str(path)!r}, {TOKEN!r}"
        code, replaced = re.subn(r"^URL, FILE, TOKEN = .*$", setting, code, flags=re.MULTILINE)
        assert replaced == 1
        namespace: dict = {}
        exec(compile(code, "docs/live.md", "exec"), namespace)  # noqa: S102 - the project's own documentation
    events = namespace["events"]
    assert [(e["start_s"], e["end_s"], e["speech"], e["emotion"]) for e in events] == [
        (pytest.approx(e.start_s), pytest.approx(e.end_s), e.speech, e.emotion) for e in expected]
    for got, want in zip(events, expected):
        assert got["probabilities"] == (None if want.probabilities is None else pytest.approx(want.probabilities, abs=1e-5))
    assert len(capsys.readouterr().out.splitlines()) == len(expected)  # one printed line per event


BAD_STARTS = [
    ("not json", "{start", "malformed JSON"),
    ("not a start", json.dumps({"type": "hello"}), "first message"),
    ("unknown format", json.dumps({"type": "start", "sample_rate": 16000, "format": "u8"}), "unknown sample format"),
    ("bad rate", json.dumps({"type": "start", "sample_rate": 12.5}), "sample_rate"),
    ("bad hop", json.dumps({"type": "start", "sample_rate": 16000, "hop_seconds": 3.0}), "hop_seconds"),
]


@pytest.mark.parametrize("name, text, words", BAD_STARTS, ids=[b[0] for b in BAD_STARTS])
def test_bad_stream_starts_get_a_4xx_message_and_the_server_goes_on(recognizer, audio, name, text, words):
    with client_for(recognizer) as client:
        with client.websocket_connect("/v1/stream") as socket:
            socket.send_text(text)
            message = socket.receive_json()
            assert message["type"] == "error" and 400 <= message["status"] < 500 and words in message["error"]
            with pytest.raises(WebSocketDisconnect):
                socket.receive_json()
        with client.websocket_connect("/v1/stream") as socket:
            assert len(stream_events(socket, audio["wave"][:40000], np.random.default_rng(0))) >= 1


def test_malformed_messages_mid_stream_are_reported_and_the_stream_goes_on(recognizer, audio):
    wave = audio["wave"][: 3 * 16000]
    with client_for(recognizer) as client, client.websocket_connect("/v1/stream") as socket:
        socket.send_text(json.dumps({"type": "start", "sample_rate": 16000, "format": "s16"}))
        socket.receive_json()
        socket.send_bytes(b"\x01\x02\x03")  # not a whole number of int16 samples
        assert "not a whole number" in socket.receive_json()["error"]
        socket.send_text("{oops")
        assert "malformed JSON" in socket.receive_json()["error"]
        socket.send_text(json.dumps({"type": "pause"}))
        assert "unknown control message" in socket.receive_json()["error"]
        socket.send_bytes(np.round(wave * 32767).astype("<i2").tobytes())
        socket.send_text(json.dumps({"type": "stop"}))
        messages = []
        while (message := socket.receive_json())["type"] != "end":
            messages.append(message)
    assert messages and all(m["type"] == "event" for m in messages)


def test_stream_limit_and_a_client_that_disconnects_frees_its_slot(recognizer, audio):
    with client_for(recognizer, max_streams=1) as client:
        with client.websocket_connect("/v1/stream") as first:
            first.send_text(json.dumps({"type": "start", "sample_rate": 16000}))
            first.receive_json()
            first.send_bytes(audio["wave"][:20000].astype("<f4").tobytes())
            with client.websocket_connect("/v1/stream") as second:
                refused = second.receive_json()
                assert refused["status"] == 503 and "limit of 1 streams" in refused["error"]
        # the first client went away mid-stream: the next stream is accepted
        deadline = time.monotonic() + 5
        while client.get("/healthz").json()["streams"] and time.monotonic() < deadline:
            time.sleep(0.02)
        with client.websocket_connect("/v1/stream") as third:
            assert len(stream_events(third, audio["wave"][:40000], np.random.default_rng(2))) >= 1


def test_a_stream_over_its_length_limit_is_closed_with_a_message(recognizer, audio):
    """Live streams have their own limit (``--max_stream_s``), not the uploads' recording length."""
    with client_for(recognizer, max_stream_s=1.0, max_duration_s=0.5) as client:
        with client.websocket_connect("/v1/stream") as socket:
            socket.send_text(json.dumps({"type": "start", "sample_rate": 16000}))
            socket.receive_json()
            for _ in range(2):  # 1.0 s in 0.5 s frames: within the limit, however short the uploads' is
                socket.send_bytes(audio["wave"][:8000].astype("<f4").tobytes())
            socket.send_bytes(audio["wave"][:8000].astype("<f4").tobytes())
            message = socket.receive_json()
            while message["type"] == "event":
                message = socket.receive_json()
            assert message["status"] == 413 and "limit of 1 s (--max_stream_s)" in message["error"]
        assert client.get("/v1/model").json()["limits"]["max_stream_s"] == 1.0


def test_idle_streams_are_closed_with_a_message(recognizer):
    with client_for(recognizer, idle_timeout_s=0.3) as client, client.websocket_connect("/v1/stream") as socket:
        socket.send_text(json.dumps({"type": "start", "sample_rate": 16000}))
        socket.receive_json()
        message = socket.receive_json()
        assert message["status"] == 408 and "no data for 0.3 s" in message["error"]


@pytest.mark.slow
def test_mixed_load_every_good_request_answered_every_bad_one_4xx_memory_flat(recognizer, audio):
    """A few hundred requests (about 10 % malformed) from threads while streams run, on a real server; not timed."""
    import httpx
    import psutil
    import uvicorn
    from websockets.sync.client import connect

    app = create_app(recognizer, ServeSettings(port=0, max_batch=16))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    expected = recognizer.predict_file(audio["short_path"])
    failures: list[str] = []

    def requests(count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=60) as http:
            for _ in range(count):
                bad = rng.random() < 0.1
                body = _truncated(audio["short"]) if bad and rng.random() < 0.5 else (b"junk" if bad else audio["short"])
                response = http.post("/v1/predict", content=body)
                if bad and not 400 <= response.status_code < 500:
                    failures.append(f"bad request answered {response.status_code}")
                if not bad and (response.status_code != 200 or response.json()["emotion"] != expected.label):
                    failures.append(f"good request answered {response.status_code}: {response.text[:200]}")

    def stream(seed: int) -> None:
        with connect(f"ws://127.0.0.1:{port}/v1/stream") as socket:
            socket.send(json.dumps({"type": "start", "sample_rate": 16000}))
            json.loads(socket.recv())
            rng = np.random.default_rng(seed)
            wave, position = audio["wave"], 0
            while position < len(wave):
                step = int(rng.integers(800, 8000))
                socket.send(wave[position : position + step].astype("<f4").tobytes())
                position += step
            socket.send(json.dumps({"type": "stop"}))
            while json.loads(socket.recv())["type"] != "end":
                pass

    def load(round_: int) -> None:
        workers = [threading.Thread(target=requests, args=(40, 10 * round_ + k)) for k in range(4)]
        workers += [threading.Thread(target=stream, args=(100 * round_ + k,)) for k in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    process = psutil.Process()
    try:
        load(0)
        after_first = process.memory_info().rss
        load(1)
        load(2)
        after_third = process.memory_info().rss
        assert not failures, failures[:5]
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "streams": 0}
        assert after_third - after_first < 64 * 2**20, (after_first, after_third)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
