"""The web page of ``serve`` in a real browser: Playwright drives Chromium against a real server (uvicorn).

The microphone is Chromium's fake capture device playing a generated recording; the page's WebSocket ``send``
is wrapped (an init script) so the test knows exactly which samples the page sent, and the events the page
shows must equal those of ``recognizer.stream`` fed with those samples offline. A file chosen on the page must
show what ``POST /v1/predict`` answers for it. Without the ``playwright`` package or a Chromium binary the
tests are skipped, saying which is missing (docs/live.md: installing Chromium, ``SER_LIGHTNING_CHROMIUM``).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from live_server import serving

pytest.importorskip("playwright.sync_api",
                    reason="the browser tests need the playwright package (pip install playwright)")

CHROMIUM_ENV = "SER_LIGHTNING_CHROMIUM"
TOKEN = "browser-test-token"
WINDOW_SECONDS, HOP_SECONDS = 1.0, 0.5  # short live windows: the first events come after a second of audio
TIMEOUT_MS = 15_000

# Every message the page sends on a WebSocket, in order: text as is, binary frames as bytes (read back as base64).
RECORD_SENT = """
(() => {
  const sent = [];
  window.__sentMessages = sent;
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    const copy = typeof data === "string" ? data
      : new Uint8Array(ArrayBuffer.isView(data) ? data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)
                                                : data.slice(0));
    send.call(this, data);
    sent.push(copy);
  };
  window.__sentBase64 = () => sent.map((m) => {
    if (typeof m === "string") return {text: m};
    let binary = "";
    for (let k = 0; k < m.length; k += 0x8000) binary += String.fromCharCode.apply(null, m.subarray(k, k + 0x8000));
    return {bytes: btoa(binary)};
  });
})();
"""


def find_chromium() -> tuple[str | None, str]:
    """The Chromium binary to drive, and where it came from (or why there is none)."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured, f"from ${CHROMIUM_ENV}"
        return None, f"${CHROMIUM_ENV}={configured} is not an executable file"
    candidates = ["/usr/lib/chromium/chromium"]  # Debian's real binary (/usr/bin/chromium is a shell wrapper)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            real = Path("/usr/lib") / name / name
            candidates += [str(real), found] if _is_script(found) else [found]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, "found on this system"
    return None, (f"no Chromium found (set {CHROMIUM_ENV}, or install it: apt-get install chromium; "
                  "looked for /usr/lib/chromium/chromium, chromium, chromium-browser, google-chrome)")


def _is_script(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"#!"


CHROMIUM, CHROMIUM_FROM = find_chromium()
if CHROMIUM is None:
    pytest.skip(CHROMIUM_FROM, allow_module_level=True)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def recording(tiny_corpus, tmp_path_factory) -> Path:
    """About 5 s of speech (two tiny-corpus utterances of different emotions), 16-bit PCM WAV: the fake microphone
    plays it (looping), and it is the file chosen on the page (longer than the 4 s predict window: a timeline)."""
    files = sorted(tiny_corpus.glob("Actor_01/*.wav"))
    parts = [sf.read(files[k], dtype="float32") for k in (0, len(files) - 1)]
    assert all(rate == 16000 for _, rate in parts)
    path = tmp_path_factory.mktemp("browser") / "two_utterances.wav"
    sf.write(path, np.concatenate([samples for samples, _ in parts]), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def recognizer(seed1d_checkpoint):
    from ser_lightning.inference.recognizer import EmotionRecognizer

    return EmotionRecognizer.from_checkpoint(seed1d_checkpoint)


@pytest.fixture(scope="module")
def server(recognizer):
    """The app of ``serve`` on 127.0.0.1 and a free port, with a token; yields its base URL."""
    with serving(recognizer, token=TOKEN, window_seconds=WINDOW_SECONDS, hop_seconds=HOP_SECONDS) as url:
        yield url


@pytest.fixture(scope="module")
def browser(recording):
    """Chromium (headless) whose microphone plays ``recording``; closed after the module's tests."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={recording}", "--autoplay-policy=no-user-gesture-required"])
    except Exception:
        playwright.stop()
        raise
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.add_init_script(RECORD_SENT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def open_page(page, server: str, token: str = TOKEN) -> None:
    page.goto(f"{server}/?token={token}")
    page.wait_for_function("document.querySelector('#status').dataset.state !== 'loading'")


def sent_messages(page) -> tuple[dict, list[bytes], dict]:
    """What the page sent on its WebSocket: the first message, the binary frames after it, and the last message,
    which must be the only other text message."""
    sent = page.evaluate("window.__sentBase64()")
    assert len(sent) >= 2 and "text" in sent[0] and "text" in sent[-1], f"the page sent {len(sent)} messages"
    assert all("bytes" in message for message in sent[1:-1]), "a text message among the audio frames"
    return json.loads(sent[0]["text"]), [base64.b64decode(m["bytes"]) for m in sent[1:-1]], json.loads(sent[-1]["text"])


def loudness(samples: np.ndarray, rate: int, frame_seconds: float = 0.02) -> np.ndarray:
    """RMS of consecutive 20 ms frames."""
    size = round(rate * frame_seconds)
    count = samples.size // size
    return np.sqrt(np.mean(samples[: count * size].reshape(count, size).astype(np.float64) ** 2, axis=1))


# ------------------------------------------------------------------ tests
def test_microphone_events_equal_the_stream_of_the_audio_the_page_sent(page, server, recognizer, recording):
    open_page(page, server)
    page.click("#start")
    page.wait_for_function("document.querySelectorAll('#events tr').length >= 3")
    page.click("#stop")
    page.wait_for_function("['done', 'error'].includes(document.querySelector('#status').dataset.state)")
    status = page.inner_text("#status")
    assert page.get_attribute("#status", "data-state") == "done", status

    start, frames, last = sent_messages(page)
    assert start["type"] == "start" and start["format"] == "f32" and start["channels"] == 1
    assert start["sample_rate"] == page.evaluate("new AudioContext().sampleRate")
    assert last == {"type": "stop"}, "the page sent audio after stop, or no stop"
    samples = np.frombuffer(b"".join(frames), dtype="<f4")
    assert samples.size > WINDOW_SECONDS * start["sample_rate"]
    # what was sent is the microphone's recording, at the rate declared, with no chunk lost: its loudness
    # contour follows the file's (the fake device loops the file; it may start a little into it)
    played, rate = sf.read(recording, dtype="float32")
    sent, heard = loudness(samples, start["sample_rate"]), loudness(np.tile(played, 2), rate)
    match = max(np.corrcoef(sent, heard[lag : lag + sent.size])[0, 1] for lag in range(heard.size - sent.size + 1))
    assert match > 0.9, f"the audio the page sent does not follow the recording (correlation {match:.3f})"

    stream = recognizer.stream(start["sample_rate"], WINDOW_SECONDS, HOP_SECONDS)
    expected = [event.to_json() for event in stream.push(samples) + stream.close()]
    shown = page.eval_on_selector_all("#events tr", """rows => rows.map(r => ({
        index: Number(r.dataset.index), start_s: Number(r.dataset.start), end_s: Number(r.dataset.end),
        speech: r.dataset.speech === 'true', emotion: r.dataset.emotion || null,
        probabilities: r.dataset.probabilities ? JSON.parse(r.dataset.probabilities) : null}))""")
    assert len(shown) == len(expected) >= 3
    assert any(event["speech"] for event in expected), "the fake microphone's audio gave no speech window"
    for row, event in zip(shown, expected):
        assert row["index"] == event["index"]
        assert row["start_s"] == pytest.approx(event["start_s"], abs=1e-6)
        assert row["end_s"] == pytest.approx(event["end_s"], abs=1e-6)
        assert row["speech"] == event["speech"]
        assert row["emotion"] == event["emotion"]
        if event["probabilities"] is None:
            assert row["probabilities"] is None
        else:
            assert row["probabilities"] == pytest.approx(event["probabilities"], abs=1e-5)
    final = expected[-1]
    assert page.get_attribute("#current-emotion", "data-emotion") == (final["emotion"] if final["speech"] else "")
    assert page.get_attribute("#speech", "data-speech") == str(final["speech"]).lower()
    assert page.get_attribute("#timeline", "data-windows") == str(len(expected))


def test_chosen_file_shows_what_predict_answers(page, server, recording):
    import httpx

    open_page(page, server)
    page.set_input_files("#file-input", str(recording))
    page.wait_for_function("document.querySelector('#file-result').dataset.emotion !== '' || "
                           "document.querySelector('#status').dataset.state === 'error'")
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#status")

    response = httpx.post(f"{server}/v1/predict", headers={"Authorization": f"Bearer {TOKEN}"},
                          files={"file": (recording.name, recording.read_bytes(), "audio/wav")}, timeout=30)
    assert response.status_code == 200, response.text
    expected = response.json()
    assert expected["windows"], "the recording should be longer than one predict window"
    assert page.get_attribute("#file-result", "data-emotion") == expected["emotion"]
    assert page.text_content("#file-emotion") == expected["emotion"]
    assert page.text_content("#file-duration") == f"{expected['duration_s']:.2f}"
    shown = dict(page.eval_on_selector_all("#file-probabilities li",
                                           "items => items.map(i => [i.dataset.class, i.dataset.probability])"))
    assert shown == {name: f"{p:.3f}" for name, p in expected["probabilities"].items()}
    assert page.get_attribute("#file-timeline", "data-windows") == str(len(expected["windows"]))


def test_wrong_token_errors_are_shown(page, server):
    open_page(page, server, token="not-the-token")
    assert page.get_attribute("#status", "data-state") == "error"
    assert "401" in page.inner_text("#status") and "token" in page.inner_text("#status")
    page.click("#start")  # the stream refuses the token too: its error message is shown
    page.wait_for_function("document.querySelector('#status').textContent.includes('Server error 401')")
    assert "wrong token" in page.inner_text("#status")


def test_capture_worklet_posts_every_sample_in_order(page, server):
    # a known signal rendered offline through the page's worklet: its chunks, joined, must be that signal
    page.goto(f"{server}/")
    result = page.evaluate("""async () => {
      const rate = 16000, length = 5000;
      const context = new OfflineAudioContext(1, length, rate);
      await context.audioWorklet.addModule("/web/capture-worklet.js");
      const buffer = context.createBuffer(1, length, rate);
      const signal = buffer.getChannelData(0);
      for (let k = 0; k < length; k++) signal[k] = ((k % 997) + 1) / 1024;
      const source = context.createBufferSource();
      source.buffer = buffer;
      const node = new AudioWorkletNode(context, "capture-processor", {channelCount: 1,
        channelCountMode: "explicit", processorOptions: {chunkSize: 300}});
      const chunks = [];
      const flushed = new Promise((resolve) => {
        node.port.onmessage = (message) => message.data.type === "chunk" ? chunks.push(Array.from(message.data.samples))
                                                                        : resolve();
      });
      source.connect(node);
      node.connect(context.destination);
      source.start();
      await context.startRendering();
      node.port.postMessage({type: "flush"});
      await flushed;
      return {sizes: chunks.map((chunk) => chunk.length), samples: chunks.flat(), signal: Array.from(signal)};
    }""")
    sizes, samples, signal = result["sizes"], np.array(result["samples"]), np.array(result["signal"])
    assert sizes[:-1] == [300] * (len(sizes) - 1) and 0 < sizes[-1] <= 300
    assert samples.size >= signal.size
    np.testing.assert_array_equal(samples[: signal.size], signal)
    assert not samples[signal.size :].any()  # after the source ends: render quanta of silence, if any
