"""Live and served use: streaming compute per hop, live streams in real time, HTTP predict throughput.

Takes checkpoints (`--ckpt_path`, several: a seed ensemble) or trains the recommended configuration for one
epoch per seed on the built-in synthetic corpus (speed does not depend on training), then measures:

1. **Stream compute per hop** (in process, one stream, 0.5 s of audio pushed per hop, 2 s windows): p50/p95/p99
   of `EmotionStream.push` (features of the new audio, the window's edge frames, voice activity, running speaker
   statistics, the model), against the obvious alternative: every window recomputed from its raw samples
   (`predict_batch` on the window); with the allocator settings `serve` runs with (``runtime.keep_freed_memory``).
2. **Live streams through the server** (`serve` in a subprocess; N WebSocket clients, each sending its audio in
   real time in 20 ms frames): how late each event arrives after the last sample of its window was sent
   (p50/p95/p99/max), events dropped, and the server's memory per open stream.
3. **HTTP predict** (`POST /v1/predict` of a 3 s recording by C concurrent clients for a fixed time): throughput
   and p95 latency, batching on (`--max_batch 32 --max_wait_ms 5`) against off (`--max_batch 1 --max_wait_ms 0`);
   and, in process, the work of one upload (what the server does for it outside HTTP: decoding, features, its own
   speaker statistics, the model, the JSON record) with the model's forward pass timed apart: the share that
   batching can share.

    python benchmarks/bench_serve.py [--ckpt_path A.ckpt [--ckpt_path B.ckpt ...]] [--quick] [--json out.json]

Timings depend on the machine and on what else runs on it: the load average before the run is printed.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from common import environment, format_table, goal, print_environment, print_goals, write_json

RATE = 16000
FRAME_S = 0.02
GOAL_HOP_P95_MS = 10.0
GOAL_LATE_MS = 250.0
GOAL_BATCHING_GAIN = 3.0


def train_checkpoints(workdir: Path, seeds: int) -> list[Path]:
    """One epoch of the recommended configuration per seed, through the command line."""
    from ser_lightning.cli import main

    paths = []
    for seed in range(seeds):
        root = workdir / f"seed{seed}"
        main(["fit", "--config", "recommended", f"--seed_everything={seed}", "--trainer.max_epochs=1",
              f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--test_after_fit=false", "--baseline=false",
              "--figures.every_n_epochs=0"])
        paths.append(sorted(root.rglob("epoch*.ckpt"))[0])
    return paths


def speech(seconds: float) -> np.ndarray:
    """Synthetic speech from the built-in corpus, utterances back to back, ``seconds`` long (16 kHz)."""
    from ser_lightning.data.synth import ensure_synthetic_corpus

    files = sorted(ensure_synthetic_corpus().rglob("*.wav"))
    parts, total, k = [], 0, 0
    while total < seconds * RATE:
        wave, _ = sf.read(files[(37 * k) % len(files)], dtype="float32")
        parts.append(wave)
        total += len(wave)
        k += 1
    return np.concatenate(parts)[: int(seconds * RATE)]


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "p99": float(np.percentile(array, 99)), "max": float(array.max()), "count": int(array.size)}


# ----------------------------------------------------------------- 1. one stream in process
def hop_times(recognizer: Any, audio: np.ndarray, hop_s: float = 0.5) -> dict[str, Any]:
    """ms per hop of one stream: its features computed incrementally against each window computed from its raw
    samples (the same statistics, no voice activity: the same work otherwise), and the whole live stream (voice
    activity and running speaker statistics included)."""
    hop = int(hop_s * RATE)
    stats = recognizer.speaker_statistics([torch.from_numpy(audio)]) if recognizer.needs_speaker_stats else None
    same = recognizer.stream(RATE, 2.0, hop_s, classify_silence=True, vad=None, speaker_statistics=stats)
    live = recognizer.stream(RATE, 2.0, hop_s, classify_silence=True)
    times: dict[str, list[float]] = {"incremental_ms": [], "recompute_ms": [], "live_stream_ms": []}
    for stream in (same, live):
        stream.push(audio[: 2 * RATE - hop])  # the first window needs 2 s; time the hops after it
    for start in range(2 * RATE - hop, len(audio) - hop + 1, hop):
        chunk = audio[start : start + hop]
        for name, run in (("incremental_ms", lambda: same.push(chunk)), ("live_stream_ms", lambda: live.push(chunk)),
                          ("recompute_ms", lambda: recognizer.predict_batch(
                              [audio[start + hop - 2 * RATE : start + hop]], RATE, speaker_stats=stats))):
            begin = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - begin))
    return {name: percentiles(values[2:]) for name, values in times.items()}


def upload_work(recognizer: Any, body: bytes, repeats: int) -> dict[str, float]:
    """ms of one upload's work in process (``predict_bytes``, one thread), and of the model's forward passes in it."""
    from ser_lightning.inference.serve import ServeSettings, predict_bytes

    settings, forward_s = ServeSettings(), []
    module = recognizer.module
    original = module.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        out = original(*args, **kwargs)
        forward_s.append(time.perf_counter() - begin)
        return out

    module.forward = timed
    try:
        for _ in range(max(2, repeats // 10)):  # warm-up
            predict_bytes(recognizer, body, "upload.wav", settings, None)
        forward_s.clear()
        begin = time.perf_counter()
        for _ in range(repeats):
            predict_bytes(recognizer, body, "upload.wav", settings, None)
        total_s = (time.perf_counter() - begin) / repeats
    finally:
        del module.forward  # the instance attribute: the class's forward again
    model_s = sum(forward_s) / repeats
    return {"upload_ms": 1000 * total_s, "model_ms": 1000 * model_s, "model_share": model_s / total_s}


# ----------------------------------------------------------------- the server in a subprocess
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python -m ser_lightning serve`` in a subprocess (its own interpreter: its threads are its own)."""

    def __init__(self, checkpoints: list[Path], *options: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "ser_lightning", "serve", *(a for p in checkpoints for a in ("--ckpt_path", str(p))),
                   "--port", str(self.port), "--max_streams", "128", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.process.poll() is not None:
                raise SystemExit(f"the server did not start:\n{self.process.stdout.read()}")
        raise SystemExit("the server did not answer within 120 s")

    def rss(self) -> int:
        return int(Path(f"/proc/{self.process.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# ----------------------------------------------------------------- 2. live streams
async def live_stream(port: int, audio: np.ndarray, hop_s: float, lateness: list[float], counts: list[int],
                      opened: asyncio.Event | None = None) -> None:
    """Send ``audio`` in real time in 20 ms frames; record how late each event comes after its window's end."""
    import websockets

    frame = int(FRAME_S * RATE)
    sent_at: dict[int, float] = {}  # samples sent so far -> when
    # no per-message compression (the server declines it): a cheaper client on the cores the server runs on
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE, "format": "f32", "hop_seconds": hop_s}))
        json.loads(await ws.recv())
        if opened is not None:
            opened.set()
        received = 0

        async def reader() -> None:
            nonlocal received
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "end":
                    return
                if event["type"] != "event":
                    raise RuntimeError(event)
                end = round(event["end_s"] * RATE)
                if end in sent_at:  # the end-aligned window at stop has no send time of its own
                    lateness.append(1000 * (time.monotonic() - sent_at[end]))
                received += 1

        task = asyncio.create_task(reader())
        start = time.monotonic()
        for k, first in enumerate(range(0, len(audio), frame)):
            await asyncio.sleep(max(0.0, start + k * FRAME_S - time.monotonic()))
            await ws.send(audio[first : first + frame].astype("<f4").tobytes())
            sent_at[min(len(audio), first + frame)] = time.monotonic()
        await ws.send(json.dumps({"type": "stop"}))
        await task
    expected = 1 + (len(audio) - 2 * RATE) // int(hop_s * RATE)
    counts.append(received - expected)  # >= 0 when none was dropped (the end-aligned window may add one)


def live(server: Server, streams: int, audio: np.ndarray, hop_s: float) -> dict[str, Any]:
    asyncio.run(live_stream(server.port, audio[: 3 * RATE], hop_s, [], []))  # warm-up: lazy initialisation
    lateness: list[float] = []
    counts: list[int] = []
    idle = server.rss()

    async def run() -> int:
        opened = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(live_stream(server.port, np.roll(audio, 997 * k), hop_s, lateness, counts,
                                                 opened[k])) for k in range(streams)]
        await asyncio.gather(*(event.wait() for event in opened))
        await asyncio.sleep(4.0)
        memory = server.rss()
        await asyncio.gather(*tasks)
        return memory

    memory = asyncio.run(run())
    dropped = sum(1 for c in counts if c < 0)
    return {"streams": streams, "lateness_ms": percentiles(lateness), "streams_with_dropped_events": dropped,
            "memory_per_stream_mb": (memory - idle) / streams / 2**20}


# ----------------------------------------------------------------- 3. HTTP predict
def http_load(server: Server, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while time.monotonic() < stop:
                begin = time.perf_counter()
                response = http.post("/v1/predict", content=body)
                if response.status_code != 200:
                    errors.append(response.text[:200])
                latencies.append(1000 * (time.perf_counter() - begin))

    with httpx.Client(base_url=server.url, timeout=60) as http:  # warm-up: lazy initialisation
        for _ in range(3):
            http.post("/v1/predict", content=body)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - begin
    if errors:
        raise SystemExit(f"HTTP errors: {errors[:3]}")
    return {"clients": clients, "requests_per_s": len(latencies) / elapsed, "latency_ms": percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", type=Path, action="append", help="checkpoint(s); default: train the recommended "
                                                                         "configuration for one epoch per seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the ensemble measured after one model (default 3)")
    parser.add_argument("--streams", default="1,16,32,64", help="concurrent live streams to measure")
    parser.add_argument("--clients", default="1,8,32", help="concurrent HTTP clients to measure")
    parser.add_argument("--seconds", type=float, default=12.0, help="audio per live stream (default 12 s)")
    parser.add_argument("--http_seconds", type=float, default=15.0, help="duration of each HTTP load (default 15 s)")
    parser.add_argument("--hop_seconds", type=float, default=60.0,
                        help="audio of the one-stream hop timing (default 60 s: 116 hops timed)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one model, 1 and 4 streams, 1 and 4 clients")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ser_lightning.runtime import keep_freed_memory

    keep_freed_memory()  # the allocator settings `serve` runs with (with --ckpt_path too: no training sets them here)
    if args.quick:
        args.seeds, args.streams, args.clients, args.seconds, args.http_seconds = 1, "1,4", "1,4", 4.0, 2.0
        args.hop_seconds = 6.0
    env = environment(torch.device("cpu"))
    print_environment(env)
    if env["load_average_1min"] and env["load_average_1min"] > 0.5:
        print(f"warning: load average {env['load_average_1min']:.1f} before the run: timings will be noisy")
    from ser_lightning import EmotionRecognizer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = args.ckpt_path or train_checkpoints(Path(tmp), args.seeds)
        audio = speech(max(args.seconds, 6.0))
        hop_audio = speech(args.hop_seconds)  # enough hops for a p95 that is not the maximum of a few
        recording = io.BytesIO()
        sf.write(recording, audio[: 3 * RATE], RATE, format="WAV", subtype="PCM_16")
        models = {"one model": checkpoints[:1]}
        if len(checkpoints) > 1:
            models[f"{len(checkpoints)}-seed ensemble"] = checkpoints
        results: dict[str, Any] = {"environment": env, "models": {}}
        goals = []
        for name, paths in models.items():
            recognizer = EmotionRecognizer.from_checkpoint(paths)
            entry: dict[str, Any] = {"checkpoints": [p.name for p in paths], "hop": hop_times(recognizer, hop_audio),
                                     "upload_work": upload_work(recognizer, recording.getvalue(), 20 if args.quick else 200)}
            print(f"\n== {name}: stream compute per 0.5 s hop (one stream, in process), ms")
            print(format_table(["", "p50", "p95", "p99"], [
                [k, f"{v['p50']:.2f}", f"{v['p95']:.2f}", f"{v['p99']:.2f}"] for k, v in entry["hop"].items()]))
            goals.append(goal(f"{name}: live stream hop p95 (ms)", entry["hop"]["live_stream_ms"]["p95"], GOAL_HOP_P95_MS,
                              False))
            server = Server(paths)
            try:
                entry["live"] = [live(server, int(n), audio[: int(args.seconds * RATE)], 0.5)
                                 for n in args.streams.split(",")]
            finally:
                server.stop()
            print(f"\n== {name}: live streams through the server (real time, 20 ms frames; lateness = event arrival "
                  "after its window's last sample was sent)")
            print(format_table(["streams", "p50 ms", "p95 ms", "p99 ms", "max ms", "dropped", "MB per stream"], [
                [r["streams"], f"{r['lateness_ms']['p50']:.0f}", f"{r['lateness_ms']['p95']:.0f}",
                 f"{r['lateness_ms']['p99']:.0f}", f"{r['lateness_ms']['max']:.0f}", r["streams_with_dropped_events"],
                 f"{r['memory_per_stream_mb']:.2f}"] for r in entry["live"]]))
            for r in entry["live"]:
                if r["streams"] == 32:
                    goals.append(goal(f"{name}: 32 streams, latest event (ms)", r["lateness_ms"]["max"], GOAL_LATE_MS,
                                      False))
            entry["http"] = {}
            for mode, options in (("batching on", ("--max_batch", "32", "--max_wait_ms", "5")),
                                  ("batching off", ("--max_batch", "1", "--max_wait_ms", "0"))):
                server = Server(paths, *options)
                try:
                    entry["http"][mode] = [http_load(server, recording.getvalue(), int(c), args.http_seconds)
                                           for c in args.clients.split(",")]
                finally:
                    server.stop()
            print(f"\n== {name}: POST /v1/predict of a 3 s recording")
            rows = []
            for mode, runs in entry["http"].items():
                rows += [[mode, r["clients"], f"{r['requests_per_s']:.1f}", f"{r['latency_ms']['p95']:.0f}"] for r in runs]
            print(format_table(["", "clients", "requests/s", "p95 ms"], rows))
            work = entry["upload_work"]
            print(f"one upload's work in process: {work['upload_ms']:.1f} ms, of which the model's forward "
                  f"{work['model_ms']:.1f} ms ({100 * work['model_share']:.0f} %: what batching can share)")
            on, off = (entry["http"][m][-1]["requests_per_s"] for m in ("batching on", "batching off"))
            entry["batching_gain"] = on / off
            goals.append(goal(f"{name}: batching gain at {args.clients.split(',')[-1]} clients", on / off,
                              GOAL_BATCHING_GAIN))
            results["models"][name] = entry
        results["goals"] = goals
        print()
        print_goals(goals)
        write_json(args.json, results)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
