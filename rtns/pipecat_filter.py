"""rtns as a Pipecat audio filter: the place Pipecat offers for Krisp, Koala and RNNoise
(``TransportParams(audio_in_filter=RtnsFilter())``), running the engine in this process.

    from pipecat.transports.base_transport import TransportParams
    from rtns.pipecat_filter import RtnsFilter

    params = TransportParams(audio_in_enabled=True, audio_in_filter=RtnsFilter())

The transport calls :meth:`RtnsFilter.start` with its sample rate, then :meth:`filter` with
each chunk of its 16-bit PCM (``s16le``, interleaved ``channels``). The filter is one
:class:`rtns.streams.ChannelStream` at that rate, so its output is ``ChannelStream``'s:
delayed by the model's latency (24 ms for the shipped packs, plus the resampler's at other
rates than 16 kHz) and in whole 8 ms hops, so a call may return fewer bytes than it got, or
none (Pipecat skips empty chunks). Controls, as Pipecat's frames: ``FilterEnableFrame(False)``
bypasses (the input, with the same delay, so switching never jumps), and
``FilterUpdateSettingsFrame(settings={"atten_lim_db": 12})`` (a number of dB or "off") sets
the attenuation limit. Needs ``pip install 'rtns[pipecat]'``; Pipecat brings no torch.

The model runs in the caller's event loop (as Pipecat's other filters do): a 20 ms chunk
costs about 1-3 ms of one core with the shipped packs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pipecat.audio.filters.base_audio_filter import BaseAudioFilter
from pipecat.frames.frames import FilterControlFrame, FilterEnableFrame, FilterUpdateSettingsFrame

from rtns.atten import AttenLimit, AttenLimitError
from rtns.daemon.protocol import decode_pcm, encode_pcm
from rtns.errors import RtnsError

#: The settings FilterUpdateSettingsFrame may carry.
SETTINGS = ("atten_lim_db",)


class RtnsFilter(BaseAudioFilter):
    """Noise suppression for a Pipecat transport (see the module docstring).

    ``model``: a pack name or folder (None: the default pack, as ``rtns enhance``);
    ``atten_lim_db``: dB or "off" (None: the pack's own); ``channels``: of the transport's
    audio; ``threads``: onnxruntime threads.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        atten_lim_db: float | str | None = None,
        channels: int = 1,
        threads: int = 1,
    ) -> None:
        from rtns.cli.files import load_model

        self.model = load_model(None if model is None else str(model), threads)
        self.channels = channels
        self.atten_lim = None if atten_lim_db is None else AttenLimit.parse(atten_lim_db)
        self.bypass = False
        self.stream = None

    @property
    def latency(self) -> int:
        """Output sample k estimates input sample k - latency (at the transport's rate)."""
        if self.stream is None:
            raise RtnsError("the filter has not been started")
        return self.stream.latency

    async def start(self, sample_rate: int) -> None:
        from rtns.streams import ChannelStream

        self.stream = ChannelStream(self.model, self.channels, sample_rate)
        self._apply()

    async def stop(self) -> None:
        self.stream = None

    def _apply(self) -> None:
        if self.stream is not None:
            self.stream.bypass = self.bypass
            if self.atten_lim is not None:
                self.stream.atten_lim = self.atten_lim

    async def process_frame(self, frame: FilterControlFrame) -> None:
        if isinstance(frame, FilterEnableFrame):
            self.bypass = not frame.enable
        elif isinstance(frame, FilterUpdateSettingsFrame):
            unknown = sorted(set(frame.settings) - set(SETTINGS))
            if unknown:
                raise RtnsError(f"rtns filter: unknown settings {unknown} (it takes {SETTINGS})")
            if "atten_lim_db" in frame.settings:
                try:
                    self.atten_lim = AttenLimit.parse(frame.settings["atten_lim_db"])
                except AttenLimitError as e:
                    raise RtnsError(f"rtns filter: {e}") from None
        self._apply()

    async def filter(self, audio: bytes) -> bytes:
        if self.stream is None:
            raise RtnsError("the filter has not been started")
        x = decode_pcm(audio, "s16le", self.channels)
        y: np.ndarray = self.stream.push(x)
        return encode_pcm(y, "s16le")
