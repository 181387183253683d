"""saw-sglang: SAW-INT4 KV cache (token-wise INT4 + block-Hadamard rotation) for SGLang."""

__version__ = "0.1.0"

SUPPORTED_SGLANG = ">=0.5.17,<0.5.18"


def __getattr__(name):
    # Lazy: `import saw_sglang` stays light (no SGLang / torch import).
    if name == "Engine":
        from saw_sglang.engine import Engine

        return Engine
    raise AttributeError(f"module 'saw_sglang' has no attribute {name!r}")
