// The page of `python -m ser_lightning serve`: the microphone streamed to WS /v1/stream (samples captured by
// capture-worklet.js), a dropped or chosen file sent to POST /v1/predict, and both drawn as class probabilities
// over time. Plain JavaScript, no dependencies. A `?token=...` in the page's address is passed on to the server.
"use strict";

(() => {
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22"];
  const LIVE_SECONDS = 30;  // the live chart shows the last 30 s
  const MAX_ROWS = 1000;  // rows kept in the table of received windows (the oldest go first)
  const LITTLE_ENDIAN = new Uint8Array(new Float32Array([1]).buffer)[3] === 0x3f;
  const token = new URLSearchParams(window.location.search).get("token");
  const $ = (id) => document.getElementById(id);

  let model = null;  // GET /v1/model
  let session = null;  // the live stream, while there is one
  let liveWindows = [];
  let fileWindows = null;

  function setStatus(text, state) {
    $("status").textContent = text;
    $("status").dataset.state = state || "info";
  }

  function authHeaders() {
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function errorOf(response) {
    // the server answers errors with {"status": "error", "error": "..."}
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error;
      }
    } catch (error) {
      // not JSON: keep the status text
    }
    return `${response.status}: ${message}`;
  }

  function classColor(name) {
    const index = model ? model.classes.indexOf(name) : -1;
    return COLORS[(index < 0 ? 0 : index) % COLORS.length];
  }

  // ------------------------------------------------------------------ the chart
  // `windows`: {start_s, end_s, probabilities (or null), speech (optional)}; `span`: [first, last] second shown
  function drawTimeline(canvas, windows, span) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.dataset.windows = String(windows.length);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const left = 34, right = 8, top = 8, strip = 8, bottom = 22 + strip;
    const plotW = Math.max(1, width - left - right), plotH = Math.max(1, height - top - bottom);
    const [t0, t1] = span;
    const x = (t) => left + ((t - t0) / Math.max(1e-9, t1 - t0)) * plotW;
    const y = (p) => top + (1 - p) * plotH;

    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#666";
    g.strokeStyle = "#ddd";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const p of [0, 0.5, 1]) {
      g.beginPath();
      g.moveTo(left, y(p));
      g.lineTo(left + plotW, y(p));
      g.stroke();
      g.fillText(p.toFixed(1), left - 4, y(p));
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    const step = niceStep((t1 - t0) / Math.max(2, Math.floor(plotW / 70)));
    for (let t = Math.ceil(t0 / step) * step; t <= t1 + 1e-9; t += step) {
      g.fillText(`${+t.toFixed(2)} s`, x(t), top + plotH + strip + 6);
    }

    // speech strip under the plot: each window painted over the earlier ones (grey: no speech)
    for (const w of windows) {
      if (w.speech === undefined) {
        continue;
      }
      g.fillStyle = w.speech ? "#5aa469" : "#c8c8c8";
      const a = Math.max(x(w.start_s), left), b = Math.min(x(w.end_s), left + plotW);
      if (b > a) {
        g.fillRect(a, top + plotH + 2, b - a, strip - 2);
      }
    }

    // one line per class through the windows' centres; a window without probabilities breaks the line
    const classes = model ? model.classes : [];
    g.lineWidth = 2;
    for (const name of classes) {
      g.strokeStyle = g.fillStyle = classColor(name);
      g.beginPath();
      let drawing = false;
      for (const w of windows) {
        const p = w.probabilities ? w.probabilities[name] : undefined;
        if (p === undefined) {
          drawing = false;
          continue;
        }
        const cx = x((w.start_s + w.end_s) / 2), cy = y(p);
        if (drawing) {
          g.lineTo(cx, cy);
        } else {
          g.moveTo(cx, cy);
        }
        drawing = true;
      }
      g.stroke();
      for (const w of windows) {
        const p = w.probabilities ? w.probabilities[name] : undefined;
        if (p !== undefined) {
          g.beginPath();
          g.arc(x((w.start_s + w.end_s) / 2), y(p), 2.5, 0, 2 * Math.PI);
          g.fill();
        }
      }
    }
  }

  function niceStep(raw) {
    const power = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-6))));
    for (const factor of [1, 2, 5, 10]) {
      if (raw <= factor * power) {
        return factor * power;
      }
    }
    return 10 * power;
  }

  function drawLive() {
    const end = liveWindows.length ? liveWindows[liveWindows.length - 1].end_s : 0;
    const span = model ? model.stream.window_seconds : 1;
    drawTimeline($("timeline"), liveWindows, [Math.max(0, end - LIVE_SECONDS), Math.max(end, span)]);
  }

  function drawFile() {
    if (fileWindows) {
      drawTimeline($("file-timeline"), fileWindows.windows, [0, Math.max(fileWindows.duration, 1e-3)]);
    }
  }

  function showLegend() {
    const legend = $("legend");
    legend.replaceChildren(...model.classes.map((name) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = classColor(name);
      item.append(swatch, name);
      return item;
    }));
    const speech = document.createElement("li");
    speech.innerHTML = '<span class="swatch strip speech"></span>speech ' +
      '<span class="swatch strip silence"></span>no speech';
    legend.append(speech);
  }

  // ------------------------------------------------------------------ the model
  async function loadModel() {
    try {
      const response = await fetch("/v1/model", { headers: authHeaders() });
      if (!response.ok) {
        throw new Error(await errorOf(response));
      }
      model = await response.json();
    } catch (error) {
      setStatus(`Could not read the model: ${error.message}`, "error");
      $("model-info").textContent = "No model information.";
      return;
    }
    const stream = model.stream;
    $("model-info").textContent = `${model.arch} · ${model.classes.join(", ")} · live windows of ` +
      `${stream.window_seconds} s every ${stream.hop_seconds} s · voice activity: ${stream.vad}`;
    showLegend();
    drawLive();
    setStatus("Ready: start the microphone, or drop a recording.", "idle");
  }

  // ------------------------------------------------------------------ live
  function streamUrl() {
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    return `${scheme}://${window.location.host}/v1/stream${query}`;
  }

  function littleEndian(samples) {
    if (LITTLE_ENDIAN) {
      return samples.buffer;
    }
    const view = new DataView(new ArrayBuffer(samples.length * 4));
    samples.forEach((value, k) => view.setFloat32(4 * k, value, true));
    return view.buffer;
  }

  async function start() {
    if (session) {
      return;
    }
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      setStatus("This browser gives no microphone to this page (it needs https, or an address on this machine).",
        "error");
      return;
    }
    $("start").disabled = true;
    setStatus("Asking for the microphone…", "busy");
    const current = { stopping: false, stopSent: false, ended: false, failed: false, count: 0 };
    session = current;
    try {
      // the model was trained on unprocessed recordings: no echo cancellation, noise suppression or gain control
      current.media = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      });
      current.context = new AudioContext();
      await current.context.audioWorklet.addModule("/web/capture-worklet.js");
    } catch (error) {
      setStatus(`No microphone: ${error.message || error.name}`, "error");
      release(current);
      session = null;
      $("start").disabled = false;
      return;
    }
    liveWindows = [];
    $("events").replaceChildren();
    showCurrent(null);
    drawLive();
    setStatus("Connecting to the server…", "busy");
    const socket = new WebSocket(streamUrl());
    socket.binaryType = "arraybuffer";
    current.socket = socket;
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: "start", sample_rate: Math.round(current.context.sampleRate),
        format: "f32", channels: 1 }));
      connectAudio(current);
      $("stop").disabled = false;
    };
    socket.onmessage = (message) => receive(current, message.data);
    socket.onerror = () => {
      current.failed = true;
      setStatus("The connection to the server failed.", "error");
    };
    socket.onclose = (event) => {
      if (!current.ended && !current.failed) {
        setStatus(`The server closed the stream (code ${event.code}${event.reason ? `: ${event.reason}` : ""}).`,
          "error");
      }
      release(current);
      session = null;
      $("start").disabled = false;
      $("stop").disabled = true;
    };
  }

  function connectAudio(current) {
    const context = current.context;
    current.source = context.createMediaStreamSource(current.media);
    current.node = new AudioWorkletNode(context, "capture-processor", {
      numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit",
      channelInterpretation: "speakers", processorOptions: { chunkSize: 2048 },
    });
    current.node.port.onmessage = (message) => {
      const data = message.data;
      if (data.type === "chunk" && !current.stopSent && current.socket.readyState === WebSocket.OPEN) {
        current.socket.send(littleEndian(data.samples));
      } else if (data.type === "flushed" && current.flushed) {
        current.flushed();
      }
    };
    current.source.connect(current.node);
    current.node.connect(context.destination);  // the node writes silence; connected, the context keeps it running
    if (context.state === "suspended") {
      context.resume();
    }
  }

  async function stop() {
    const current = session;
    if (!current || current.stopping) {
      return;
    }
    current.stopping = true;
    $("stop").disabled = true;
    setStatus("Stopping: the last windows…", "busy");
    if (current.node) {
      // every captured sample goes out before the stop message (at most half a second's wait)
      await new Promise((resolve) => {
        current.flushed = resolve;
        current.node.port.postMessage({ type: "flush" });
        setTimeout(resolve, 500);
      });
    }
    release(current);
    if (current.socket && current.socket.readyState === WebSocket.OPEN) {
      current.socket.send(JSON.stringify({ type: "stop" }));
      setTimeout(() => {
        if (!current.ended && current.socket.readyState === WebSocket.OPEN) {
          current.failed = true;
          setStatus("The server did not finish the stream within 10 s; the connection is closed.", "error");
          current.socket.close();
        }
      }, 10000);
    }
    current.stopSent = true;
  }

  function release(current) {
    if (current.source) {
      current.source.disconnect();
    }
    if (current.node) {
      current.node.disconnect();
    }
    if (current.media) {
      current.media.getTracks().forEach((track) => track.stop());
    }
    if (current.context && current.context.state !== "closed") {
      current.context.close();
    }
    current.source = current.node = current.media = null;
  }

  function receive(current, text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch (error) {
      setStatus("The server sent a message the page cannot read.", "error");
      return;
    }
    if (message.type === "ready") {
      setStatus(`Listening (${message.sample_rate} Hz)…`, "live");
    } else if (message.type === "event") {
      current.count += 1;
      addEvent(message);
    } else if (message.type === "error") {
      current.failed = true;
      setStatus(`Server error ${message.status}: ${message.error}`, "error");
    } else if (message.type === "end") {
      current.ended = true;
      if (!current.failed) {
        setStatus(`Stopped: ${current.count} windows.`, "done");
      }
      current.socket.close();
    }
  }

  function addEvent(event) {
    liveWindows.push(event);
    const end = event.end_s;
    while (liveWindows.length && liveWindows[0].end_s < end - 2 * LIVE_SECONDS) {
      liveWindows.shift();
    }
    const row = document.createElement("tr");
    row.dataset.index = String(event.index);
    row.dataset.emotion = event.emotion || "";
    row.dataset.speech = String(event.speech);
    row.dataset.start = String(event.start_s);
    row.dataset.end = String(event.end_s);
    if (event.probabilities) {
      row.dataset.probabilities = JSON.stringify(event.probabilities);
    }
    const top = event.probabilities ? Math.max(...Object.values(event.probabilities)).toFixed(3) : "–";
    for (const text of [`${event.start_s.toFixed(2)}–${event.end_s.toFixed(2)}`, event.speech ? "yes" : "no",
      event.emotion || "–", top]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const rows = $("events");
    rows.append(row);
    while (rows.childElementCount > MAX_ROWS) {
      rows.firstElementChild.remove();
    }
    showCurrent(event);
    drawLive();
  }

  function showCurrent(event) {
    const emotion = $("current-emotion"), speech = $("speech");
    if (!event) {
      emotion.textContent = "–";
      emotion.dataset.emotion = "";
      speech.textContent = "No window yet";
      speech.dataset.speech = "";
      return;
    }
    emotion.textContent = event.speech ? event.emotion : "–";
    emotion.dataset.emotion = event.speech ? event.emotion : "";
    emotion.style.color = event.speech ? classColor(event.emotion) : "";
    speech.textContent = event.speech ? `Speech (${event.speech_seconds.toFixed(2)} s of the window)` : "No speech";
    speech.dataset.speech = String(event.speech);
  }

  // ------------------------------------------------------------------ files
  async function upload(file) {
    if (model && file.size > model.limits.max_upload_bytes) {
      setStatus(`${file.name}: ${file.size} bytes; the server takes at most ${model.limits.max_upload_bytes}.`,
        "error");
      return;
    }
    setStatus(`Classifying ${file.name}…`, "busy");
    const form = new FormData();
    form.append("file", file, file.name);
    let response;
    try {
      response = await fetch("/v1/predict", { method: "POST", headers: authHeaders(), body: form });
    } catch (error) {
      setStatus(`${file.name}: the upload failed (${error.message}).`, "error");
      return;
    }
    if (!response.ok) {
      setStatus(`${file.name}: ${await errorOf(response)}`, "error");
      return;
    }
    const result = await response.json();
    showFile(file.name, result);
    setStatus(`${file.name}: ${result.emotion}.`, "done");
  }

  function showFile(name, result) {
    const box = $("file-result");
    box.hidden = false;
    box.dataset.emotion = result.emotion;
    box.dataset.duration = String(result.duration_s);
    $("file-name").textContent = name;
    $("file-emotion").textContent = result.emotion;
    $("file-duration").textContent = result.duration_s.toFixed(2);
    $("file-note").textContent = result.note || "";
    const classes = model ? model.classes : Object.keys(result.probabilities);
    $("file-probabilities").replaceChildren(...classes.map((label) => {
      const p = result.probabilities[label];
      const item = document.createElement("li");
      item.dataset.class = label;
      item.dataset.probability = p.toFixed(3);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${(100 * p).toFixed(1)}%`;
      bar.style.background = classColor(label);
      const text = document.createElement("span");
      text.textContent = `${label} ${p.toFixed(3)}`;
      item.append(text, bar);
      return item;
    }));
    // a recording within one window has no window list: it is drawn as one window
    const windows = result.windows.length ? result.windows
      : [{ start_s: 0, end_s: result.duration_s, probabilities: result.probabilities }];
    fileWindows = { windows, duration: result.duration_s };
    drawFile();
  }

  function setUpFiles() {
    const input = $("file-input"), zone = $("drop-zone");
    input.addEventListener("change", () => {
      if (input.files.length) {
        upload(input.files[0]);
      }
    });
    // a file dropped anywhere on the page is classified (rather than opened by the browser)
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    document.addEventListener("dragleave", () => zone.classList.remove("over"));
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer.files.length) {
        upload(event.dataTransfer.files[0]);
      }
    });
  }

  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", stop);
  window.addEventListener("resize", () => {
    drawLive();
    drawFile();
  });
  setUpFiles();
  $("start").disabled = false;
  loadModel();
})();
