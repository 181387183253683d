"""Accuracy of KV-cache modes (`python -m saw_sglang.eval --help`)."""
