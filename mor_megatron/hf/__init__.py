"""Hugging Face conversion both ways.

- `export.export`: a mor-megatron checkpoint (any layout) -> an HF folder (`LlamaForCausalLM` for a
  vanilla model, else `MoRForCausalLM` with its self-contained remote code).
- `importer.import_hf`: a Llama-family HF folder -> layout-free mor-megatron weights, filling a
  MoR model's shared block by an uptraining initialisation.
- `configuration_mor.py`, `modeling_mor.py`: the remote code copied into exported folders
  (torch + transformers only).
"""
