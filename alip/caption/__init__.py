"""Synthetic captions for ALIP's second text source (tools/caption.py).

- `alip.caption.captioner`: a Hugging Face image-to-text model + decoding settings (`Captioner`, `DecodeSettings`).
- `alip.caption.run`: batched, multi-rank, resumable captioning of data2rec's inputs (`caption_inputs`, `merge_parts`).
- `alip.caption.sidecar`: the sidecar and part files: write, read back (torn lines tolerated), merge with checks.

The modules are imported on their own so that reading a sidecar does not load torch or transformers.
"""

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"  # here, not in captioner.py: `--help` should not import torch
