"""The serving engine: score the same token windows through a running SGLang server's
prompt logprobs (`/generate`, return_logprob, max_new_tokens 1).

How it relates to the simulation: a prefill attends its own chunk with the fresh
BF16 K/V and only the cached prefix through the KV cache. With `step` = the window
length (one request per window) that is the least-quantized view. With a small
`step` each request extends the previous one by `step` tokens; the radix cache
holds the prefix, so every earlier token is read back from the (INT4) cache, as in
decode. step=1 is decode-like except the current token's own K/V, which the
simulation also quantizes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from .score import Tally


def _post(url: str, ids: list[int], start: int, top1: bool, timeout: float) -> dict:
    payload = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": start,
    }
    if top1:
        payload["top_logprobs_num"] = 1
    r = requests.post(url.rstrip("/") + "/generate", json=payload, timeout=timeout)
    r.raise_for_status()
    out = r.json()
    return (out[0] if isinstance(out, list) else out)["meta_info"]


_DTYPE_COMPRESSION = {"auto": 1.0, "bfloat16": 1.0, "bf16": 1.0, "float16": 1.0,
                      "fp8_e4m3": 2.0, "fp8_e5m2": 2.0}


def kv_compression(url: str, timeout: float = 30.0) -> float | None:
    """KV bytes of BF16 over the server's own, from /get_server_info: our servers report
    it ("saw_int4"), a stock server's `kv_cache_dtype` gives it; None when unknown."""
    try:
        r = requests.get(url.rstrip("/") + "/get_server_info", timeout=timeout)
        r.raise_for_status()
        info = r.json()
    except (requests.RequestException, ValueError):
        return None
    saw = info.get("saw_int4") or (info.get("internal_states") or [{}])[0].get("saw_int4")
    if saw and saw.get("bytes_per_token"):
        return saw["bf16_bytes_per_token"] / saw["bytes_per_token"]
    return _DTYPE_COMPRESSION.get(str(info.get("kv_cache_dtype")))


def score_window(url: str, w: list[int], step: int, top1: bool = True, timeout: float = 600.0):
    """-> (logprob of w[i] given w[:i] for i = 1..len-1, argmax token at each or None)."""
    lps: list[float] = []
    tops: list[int | None] = []
    done = 1  # tokens whose logprob we have (w[0] has none)
    while done < len(w):
        end = min(len(w), done + step)
        # Entry 0 of the reply belongs to token `start` and is None; the rest score start+1..end-1.
        meta = _post(url, w[:end], done - 1, top1, timeout)
        got = meta["input_token_logprobs"][1:]
        if len(got) != end - done:
            raise RuntimeError(f"server returned {len(got)} prompt logprobs, expected {end - done}")
        missing = [done + i for i, x in enumerate(got) if x[0] is None]
        if missing:  # JSON null: the server's logprob was NaN/inf (a broken KV mode)
            raise RuntimeError(f"server returned no logprob (NaN?) at tokens {missing[:8]} "
                               f"of a {len(w)}-token window")
        lps += [float(x[0]) for x in got]
        if top1:
            tops += [int(t[0][1]) if t else None for t in meta["input_top_logprobs"][1:]]
        done = end
    return lps, (tops if top1 else [None] * len(lps))


def score(url: str, windows: list[list[int]], step: int, ref_tops: list | None = None,
          progress=None, concurrency: int = 8) -> tuple[Tally, list]:
    """Perplexity of the windows through the server; top-1 agreement against ref_tops
    (a BF16 server's argmax tokens, same windows) when given. Windows are scored
    `concurrency` at a time (each window's requests stay in order: its step requests
    build on the radix cache of the previous one)."""
    def one(w):
        result = score_window(url, w, step)
        if progress is not None:
            progress.update(1)
        return result

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        results = list(pool.map(one, windows))
    tally = Tally()
    all_tops = []
    for lps, tops in results:
        tally.add_window(-sum(lps), len(lps))
        all_tops.append(tops)
    if ref_tops is not None:
        add_agreement(tally, all_tops, ref_tops)
    return tally, all_tops


def add_agreement(tally: Tally, tops: list, ref_tops: list) -> None:
    """Top-1 agreement of `tops` with `ref_tops` (per window, positions with both)."""
    for i, (a, b) in enumerate(zip(tops, ref_tops)):
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        tally.agree[i] = sum(x == y for x, y in pairs)
        tally.agree_n[i] = len(pairs)
