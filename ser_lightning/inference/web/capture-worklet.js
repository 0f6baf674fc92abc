// The microphone's samples, gathered off the main thread: the audio thread hands this processor 128-sample
// blocks; it posts them to the page as Float32Array chunks of `chunkSize` samples (mono, the context's rate).
// A {type: "flush"} message posts what is left and then {type: "flushed"}, so that the page can send every
// sample it captured before it tells the server to stop.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkSize = (options.processorOptions && options.processorOptions.chunkSize) || 2048;
    this.buffer = new Float32Array(this.chunkSize);
    this.filled = 0;
    this.stopped = false;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") {
        this.post(this.filled);
        this.stopped = true;
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  post(count) {
    if (count > 0) {
      const chunk = this.buffer.slice(0, count);
      this.port.postMessage({ type: "chunk", samples: chunk }, [chunk.buffer]);
    }
    this.filled = 0;
  }

  process(inputs) {
    if (this.stopped) {
      return false;
    }
    const channel = inputs[0] && inputs[0][0];  // mono: the node down-mixes its input (channelCount 1)
    if (channel) {
      let offset = 0;
      while (offset < channel.length) {
        const count = Math.min(channel.length - offset, this.chunkSize - this.filled);
        this.buffer.set(channel.subarray(offset, offset + count), this.filled);
        this.filled += count;
        offset += count;
        if (this.filled === this.chunkSize) {
          this.post(this.filled);
        }
      }
    }
    return true;
  }
}

registerProcessor("capture-processor", CaptureProcessor);
