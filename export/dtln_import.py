"""Import the official DTLN Keras weights (breizhn/DTLN, MIT) into :class:`DTLN` and a pack.

The .h5 files hold one HDF5 group per Keras layer; the root attribute ``layer_names`` lists
the layers and each layer's ``weight_names`` attribute its tensors. Names differ between
the files (``lstm/kernel:0`` in model.h5, ``lstm/lstm_cell/kernel:0`` in the norm files;
the second core's normalization is ``layer_normalization`` in model.h5 and
``instant_layer_normalization_1`` in the norm files), so every tensor is found by its layer
name and the last part of its weight name, and checked against the expected shape. Nothing
is taken by position.

Keras -> PyTorch (see shared/MODELS.md §1): LSTM ``weight_ih = kernel.T``,
``weight_hh = recurrent_kernel.T``, ``bias_ih = bias``, ``bias_hh = 0`` (Keras gate order
i, f, c, o equals PyTorch's i, f, g, o); Dense ``weight = kernel.T``; Conv1D with kernel
size 1 ``weight = kernel[0].T``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtns.errors import UserInputError
from rtns.pack import Manifest, Provenance, sha256_file

#: Upstream of the weight files (the licence travels with the weights).
UPSTREAM = (
    "breizhn/DTLN (https://github.com/breizhn/DTLN), MIT licence, (c) 2020 Nils L. Westhausen"
)

# Layer names of the official files, per DTLN part (first core, then second core).
_LSTM1 = ("lstm", "lstm_1")
_DENSE1 = "dense"
_ENCODER = "conv1d"
_LSTM2 = ("lstm_2", "lstm_3")
_DENSE2 = "dense_1"
_DECODER = "conv1d_1"
#: Input normalization of the first core (norm files only).
_NORM1 = "instant_layer_normalization"
#: Normalization of the second core: name in model.h5, name in the norm files.
_NORM2 = ("layer_normalization", "instant_layer_normalization_1")


class DTLNImportError(UserInputError):
    """The file is missing, not HDF5, or not a DTLN weight file (one-sentence message)."""


@dataclass(frozen=True)
class KerasWeights:
    """The tensors of one official .h5 file, keyed by layer then short weight name
    (``kernel``, ``recurrent_kernel``, ``bias``, ``gamma``, ``beta``)."""

    path: Path
    layers: dict[str, dict[str, np.ndarray]]

    @property
    def norm(self) -> bool:
        """True for the log-magnitude iLN variant (DTLN_norm_*.h5)."""
        return bool(self.layers.get(_NORM1))

    def get(self, layer: str, weight: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``layer/weight`` as float32 of exactly ``shape``, or DTLNImportError."""
        if layer not in self.layers:
            raise DTLNImportError(
                f"{self.path}: not a DTLN weight file (layer {layer!r} is missing)"
            )
        tensors = self.layers[layer]
        if weight not in tensors:
            have = ", ".join(sorted(tensors)) or "none"
            raise DTLNImportError(
                f"{self.path}: not a DTLN weight file (layer {layer!r} has no {weight!r} "
                f"weight; it has: {have})"
            )
        w = tensors[weight]
        if tuple(w.shape) != shape:
            raise DTLNImportError(
                f"{self.path}: layer {layer!r} weight {weight!r} has shape {tuple(w.shape)}, "
                f"DTLN needs {shape}"
            )
        return np.asarray(w, dtype=np.float32)


def _short_name(weight_name: str) -> str:
    """``lstm_1/lstm_cell_1/recurrent_kernel:0`` -> ``recurrent_kernel``."""
    return re.sub(r":\d+$", "", weight_name.rsplit("/", 1)[-1])


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_keras_h5(path: str | Path) -> KerasWeights:
    """Read every layer's named tensors from a Keras weight file (``save_weights`` layout or a
    full ``save`` with a ``model_weights`` group)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DTLNImportError(f"{path}: no such file")
    if not path.is_file():
        raise DTLNImportError(f"{path}: not a file")
    try:
        is_h5 = h5py.is_hdf5(str(path))
    except OSError as e:
        raise DTLNImportError(f"{path}: cannot read it ({e})") from None
    if not is_h5:
        raise DTLNImportError(f"{path}: not an HDF5 file (expected official DTLN Keras weights)")
    layers: dict[str, dict[str, np.ndarray]] = {}
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise DTLNImportError(
                    f"{path}: not a Keras weight file (no 'layer_names' attribute)"
                )
            for raw in root.attrs["layer_names"]:
                name = _text(raw)
                group = root[name]
                tensors: dict[str, np.ndarray] = {}
                for wraw in group.attrs.get("weight_names", []):
                    wname = _text(wraw)
                    tensors[_short_name(wname)] = np.asarray(group[wname])
                layers[name] = tensors
    except DTLNImportError:
        raise
    except (OSError, KeyError) as e:
        raise DTLNImportError(f"{path}: unreadable Keras weight file ({e})") from None
    return KerasWeights(path=path, layers=layers)


def build_dtln(weights: KerasWeights):  # -> rtns_export.dtln.DTLN
    """A PyTorch :class:`DTLN` in eval mode carrying the Keras weights (variant detected)."""
    import torch

    from rtns.framing import BLOCK_LEN, N_BINS
    from rtns_export.dtln import DTLN, DTLNConfig

    hidden = weights.get(_LSTM1[1], "recurrent_kernel", (128, 512)).shape[0]
    model = DTLN(DTLNConfig(hidden=hidden, layers=2, encoder=256, norm=weights.norm)).eval()
    enc = model.cfg.encoder
    g4 = 4 * hidden

    def put(param: torch.nn.Parameter, value: np.ndarray) -> None:
        assert tuple(param.shape) == value.shape, (param.shape, value.shape)
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def lstm(module: torch.nn.LSTM, names: tuple[str, str], n_in: int) -> None:
        for k, layer in enumerate(names):
            width = n_in if k == 0 else hidden
            put(getattr(module, f"weight_ih_l{k}"), weights.get(layer, "kernel", (width, g4)).T)
            put(
                getattr(module, f"weight_hh_l{k}"),
                weights.get(layer, "recurrent_kernel", (hidden, g4)).T,
            )
            put(getattr(module, f"bias_ih_l{k}"), weights.get(layer, "bias", (g4,)))
            put(getattr(module, f"bias_hh_l{k}"), np.zeros(g4, np.float32))

    if model.norm1 is not None:
        put(model.norm1.gamma, weights.get(_NORM1, "gamma", (N_BINS,)))
        put(model.norm1.beta, weights.get(_NORM1, "beta", (N_BINS,)))
    lstm(model.lstm1, _LSTM1, N_BINS)
    put(model.dense1.weight, weights.get(_DENSE1, "kernel", (hidden, N_BINS)).T)
    put(model.dense1.bias, weights.get(_DENSE1, "bias", (N_BINS,)))
    put(model.encoder.weight, weights.get(_ENCODER, "kernel", (1, BLOCK_LEN, enc))[0].T)
    norm2 = _NORM2[1] if weights.norm else _NORM2[0]
    put(model.norm2.gamma, weights.get(norm2, "gamma", (enc,)))
    put(model.norm2.beta, weights.get(norm2, "beta", (enc,)))
    lstm(model.lstm2, _LSTM2, enc)
    put(model.dense2.weight, weights.get(_DENSE2, "kernel", (hidden, enc)).T)
    put(model.dense2.bias, weights.get(_DENSE2, "bias", (enc,)))
    put(model.decoder.weight, weights.get(_DECODER, "kernel", (1, enc, BLOCK_LEN))[0].T)
    return model


def default_pack_name(path: str | Path) -> str:
    """``model.h5`` -> ``dtln-official``; ``DTLN_norm_500h.h5`` -> ``dtln-official-norm-500h``."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(path).stem.lower()).strip("-")
    stem = re.sub(r"^dtln-?", "", stem)
    return "dtln-official" if stem in ("", "model") else f"dtln-official-{stem}"


def import_dtln(
    h5_path: str | Path, out_dir: str | Path, *, name: str | None = None
) -> tuple[Manifest, float]:
    """Read an official DTLN .h5, export it as a pack in ``out_dir`` (created with its
    parents; must be new or empty; parity-checked by the exporter), and return (manifest,
    max abs parity error)."""
    h5_path = Path(h5_path)
    out_dir = Path(out_dir)
    weights = read_keras_h5(h5_path)
    name = name or default_pack_name(h5_path)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserInputError(f"{name!r}: a pack name may use only letters, digits, '.', '_', '-'")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserInputError(f"{out_dir}: folder is not empty; give a new or empty folder")
    model = build_dtln(weights)
    variant = "log-magnitude iLN (norm)" if weights.norm else "no input normalization"
    provenance = Provenance(
        origin=f"official DTLN weights {h5_path.name} from {UPSTREAM}",
        training_data="DNS-Challenge 2020 (see breizhn/DTLN README)",
        notes=f"converted by rtns import-dtln; variant: {variant}",
        source_file=h5_path.name,
        source_sha256=sha256_file(h5_path),
        licence="MIT (breizhn/DTLN)",
    )
    from rtns_export.dtln import export_dtln

    manifest, report = export_dtln(
        model,
        out_dir,
        name=name,
        provenance=provenance,
        description=f"official DTLN ({h5_path.name}), {variant}",
    )
    return manifest, report.max_abs_err
