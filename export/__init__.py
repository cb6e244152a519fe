"""Training and export code for rtns (needs the ``train`` extra: torch, onnx, h5py)."""
