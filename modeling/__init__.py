"""HF-convention architectures added by hf-multimax. Installed as `hf_multimax.modeling` (see README.md)."""
