// Microphone capture for the omni2-engine demo: hands each 128-frame render quantum of the first input channel
// (float32 at the AudioContext's rate) to the page, which turns it into PCM16 for input_audio_buffer.append.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("omni2-capture", Capture);
