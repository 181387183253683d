"""INT4 KV-cache kernels (Triton) and their pure-torch references.

Imports torch and triton only: usable by any engine.
"""
