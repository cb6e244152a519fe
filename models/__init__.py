"""Model packs shipped with rtns (trained by this project; see each pack's manifest.json)."""

from pathlib import Path

#: Folder holding one sub-folder per shipped pack.
PACKS_DIR = Path(__file__).resolve().parent
