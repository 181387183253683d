"""saw-sglang: SAW-INT4 KV cache (token-wise INT4 + block-Hadamard rotation) for SGLang."""

__version__ = "0.1.0"

SUPPORTED_SGLANG = ">=0.5.17,<0.5.18"
