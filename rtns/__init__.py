"""rtns: real-time streaming noise suppression on onnxruntime (no torch at run time)."""

__version__ = "0.1.0"
