"""The ZeroMQ daemon (``rtns serve``) and its client.

- :mod:`~rtns.daemon.protocol`: the wire format (pydantic headers, PCM frames, error codes);
  no zmq, no onnxruntime, so any client can reuse it.
- :mod:`~rtns.daemon.session`: one client stream around a :class:`rtns.streams.ChannelStream`.
- :mod:`~rtns.daemon.server`: the socket loop, batched ticks, closing, stats.
- :mod:`~rtns.daemon.logs`: structured log lines.
- :mod:`~rtns.daemon.client`: a Python client (tests, benchmarks, ``rtns stream``).
"""
