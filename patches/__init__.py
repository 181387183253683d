"""Everything that touches SGLang internals: one module per target, version-guarded."""
