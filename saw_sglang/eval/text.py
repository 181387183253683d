"""Evaluation texts: the bundled held-out set (one text per kind a server sees) by
default, or files / a HF dataset; and the separate calibration text.

Origins and licenses: data/SOURCES.md (notices in data/LICENSES.txt)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

# name -> (file in data/, what it is)
BUNDLED = {
    "prose": ("prose-botchan.txt", "Natsume Soseki, Botchan, ch. I (1919 English translation), public domain"),
    "code": ("code-shlex-py.txt", "CPython 3.11.7 Lib/shlex.py, PSF License"),
    "docs": ("docs-node-path.txt", "Node.js v20 API docs, path module, MIT"),
    "qa": ("qa-zlib-faq.txt", "the zlib 1.2.13 FAQ, zlib license"),
    "dialogue": ("dialogue-twelfth-night.txt", "Shakespeare, Twelfth Night, Act I sc. I-III, public domain"),
}
# Calibration (per-model factors) reads only this text, never an evaluation text.
CALIBRATION = ("calibration-opticks.txt", "Isaac Newton, Opticks (1730), start of Book I, public domain")


@dataclass(frozen=True)
class Text:
    name: str  # short label for tables
    body: str
    source: str


def _data(name: str) -> str:
    return files("saw_sglang.eval").joinpath("data", name).read_text("utf-8")


def bundled(names=None) -> list[Text]:
    """The bundled set, or the named part of it."""
    names = list(BUNDLED) if not names else names
    unknown = [n for n in names if n not in BUNDLED]
    if unknown:
        raise ValueError(f"unknown bundled text(s) {unknown}: choose from {', '.join(BUNDLED)}")
    return [Text(n, _data(BUNDLED[n][0]), BUNDLED[n][1]) for n in names]


def calibration_text() -> Text:
    return Text("calibration", _data(CALIBRATION[0]), CALIBRATION[1])


def from_files(paths) -> list[Text]:
    out = []
    for p in paths:
        path = Path(p)
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--text {p}: cannot read it as UTF-8 text ({e})") from None
        out.append(Text(path.stem, body, str(path)))
    return out


def from_dataset(dataset: str, split: str = "test", column: str = "text") -> Text:
    import datasets  # only needed for --dataset (and a network or a local cache)

    name, _, config = dataset.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split)
    return Text(name.split("/")[-1], "\n\n".join(t for t in ds[column] if t.strip()), f"dataset {dataset} ({split})")


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
