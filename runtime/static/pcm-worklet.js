// AudioWorklet: the microphone's samples -> 16 kHz mono int16, posted to the page in ~100 ms blocks.
// The page asks for a 16 kHz AudioContext, so the browser's own resampler usually does the work and
// this only converts; at any other rate each output sample is the mean of the input samples that fall
// in its 1/16000 s (a box filter: a plain anti-alias for 48 kHz or 44.1 kHz input).
const TARGET_RATE = 16000;
const BLOCK = 1600; // output samples per message (100 ms)

class PcmProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.out = new Int16Array(BLOCK);
    this.n = 0;       // output samples in this.out
    this.sum = 0;     // running sum of the current output sample's input samples
    this.count = 0;   // how many input samples are in this.sum
    this.pos = 0;     // input samples consumed, minus the output samples' spans so far
    this.stopped = false;
    this.port.onmessage = (e) => { if (e.data === "stop") { this.flush(); this.stopped = true; } };
  }

  push(x) {
    // float in [-1, 1] -> int16, scaled as files are read (x * 32768)
    const v = Math.max(-32768, Math.min(32767, Math.round(x * 32768)));
    this.out[this.n++] = v;
    if (this.n === BLOCK) this.flush();
  }

  flush() {
    if (this.n === 0) return;
    const block = this.out.slice(0, this.n);
    this.port.postMessage(block.buffer, [block.buffer]);
    this.n = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (this.stopped) return false;
    if (!channels || channels.length === 0) return true;
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let x = 0;
      for (let c = 0; c < channels.length; c++) x += channels[c][i];
      x /= channels.length; // mono: the mean of the channels, as the server mixes files
      if (this.ratio === 1) { this.push(x); continue; }
      this.sum += x; this.count++; this.pos++;
      if (this.pos >= this.ratio) { this.push(this.sum / this.count); this.sum = 0; this.count = 0; this.pos -= this.ratio; }
    }
    return true;
  }
}

registerProcessor("pcm-processor", PcmProcessor);
