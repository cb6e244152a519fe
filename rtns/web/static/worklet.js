// AudioWorklet processors of the rtns page, at the AudioContext's own rate.
//
// rtns-capture: the microphone (mixed to mono by the node) in chunks of `chunk` frames,
//   posted to the page as Float32Arrays (transferred, no copy), which sends them as they are.
// rtns-player: plays what comes back. A ring of `capacity` frames; playback starts (and
//   restarts after running dry) once `prefill` frames are queued; when more than `maxQueue`
//   frames are queued (a burst after a stall), the oldest are dropped down to `prefill`, so
//   the delay never grows. Counts under-runs and dropped frames.

class RtnsCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions.chunk;
    this.buf = new Float32Array(this.chunk);
    this.n = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      const ch = input[0];
      let i = 0;
      while (i < ch.length) {
        const k = Math.min(ch.length - i, this.chunk - this.n);
        this.buf.set(ch.subarray(i, i + k), this.n);
        this.n += k;
        i += k;
        if (this.n === this.chunk) {
          this.port.postMessage(this.buf, [this.buf.buffer]);
          this.buf = new Float32Array(this.chunk);
          this.n = 0;
        }
      }
    }
    return true;
  }
}

class RtnsPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions;
    this.cap = o.capacity;
    this.prefill = o.prefill;
    this.maxQueue = Math.min(o.maxQueue, o.capacity);
    this.ring = new Float32Array(this.cap);
    this.r = 0;
    this.size = 0;
    this.playing = false;
    this.underruns = 0;
    this.dropped = 0;
    this.port.onmessage = (e) => {
      if (e.data === "stats") {
        this.port.postMessage({underruns: this.underruns, dropped: this.dropped, queued: this.size});
      } else {
        this.push(e.data);
      }
    };
  }

  push(x) {
    let src = x;
    if (src.length > this.cap) {
      this.dropped += src.length - this.cap;
      src = src.subarray(src.length - this.cap);
    }
    const over = this.size + src.length - this.cap;
    if (over > 0) {
      this.r = (this.r + over) % this.cap;
      this.size -= over;
      this.dropped += over;
    }
    let w = (this.r + this.size) % this.cap;
    for (let i = 0; i < src.length; i++) {
      this.ring[w] = src[i];
      w = w + 1 === this.cap ? 0 : w + 1;
    }
    this.size += src.length;
    if (this.size > this.maxQueue) {
      const drop = this.size - this.prefill;
      this.r = (this.r + drop) % this.cap;
      this.size -= drop;
      this.dropped += drop;
    }
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const ch = out[0];
    if (!this.playing && this.size >= this.prefill) this.playing = true;
    if (!this.playing) {
      ch.fill(0);
    } else {
      for (let i = 0; i < ch.length; i++) {
        if (this.size > 0) {
          ch[i] = this.ring[this.r];
          this.r = this.r + 1 === this.cap ? 0 : this.r + 1;
          this.size--;
        } else {
          ch[i] = 0;
          if (this.playing) {
            this.playing = false;
            this.underruns++;
          }
        }
      }
    }
    for (let c = 1; c < out.length; c++) out[c].set(ch);
    return true;
  }
}

registerProcessor("rtns-capture", RtnsCapture);
registerProcessor("rtns-player", RtnsPlayer);
