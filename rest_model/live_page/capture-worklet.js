// Audio capture on the AudioContext's own sample clock: posts pieces of mono float32 PCM, each with the
// context frame (sample index) of its first sample, so the page can place every sample in time exactly.
// When the input has ended or is muted it posts zeros: silence keeps the stream (and the portrait) alive.
class RestCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.pieceFrames;
    this.buf = new Float32Array(this.size);
    this.fill = 0;
    this.first = -1;
    this.running = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.running = false; };
  }
  process(inputs) {
    const input = inputs[0];
    const n = 128;
    for (let i = 0; i < n; i++) {
      if (this.fill === 0) this.first = currentFrame + i;
      let v = 0;
      for (let c = 0; c < input.length; c++) v += input[c][i];
      this.buf[this.fill++] = input.length ? v / input.length : 0;
      if (this.fill === this.size) {
        this.port.postMessage({ first: this.first, samples: this.buf }, [this.buf.buffer]);
        this.buf = new Float32Array(this.size);
        this.fill = 0;
      }
    }
    return this.running;
  }
}
registerProcessor("rest-capture", RestCapture);
