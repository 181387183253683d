"""python -m saw_sglang.eval: teacher-forced accuracy of KV-cache modes.

Simulation engine (default): a transformers model whose attention round-trips every
K (after RoPE) and V through the mode's cache format (kernels/reference.py for
INT4) before SDPA, decode-like. Server engine (--server): prompt logprobs from
running SGLang servers over the same token windows."""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from saw_sglang.cli import Parser, fail

from . import models, report, text
from .modes import check_spec, default_specs, parse_mode

PROG = "python -m saw_sglang.eval"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="preset (smollm2-135m, gemma3-270m), a .gguf file, or any HF causal LM folder / hub name "
                        "(the tokenizer for --server too)")
    p.add_argument("--text", help="a UTF-8 text file (default: a bundled public-domain excerpt)")
    p.add_argument("--dataset", help="HF dataset NAME[:CONFIG] (needs network or a local cache)")
    p.add_argument("--dataset-split", default="test")
    p.add_argument("--dataset-column", default="text")
    p.add_argument("--tokens", type=int, default=3072, help="scored tokens in all (default 3072)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per teacher-forced window (default 256)")
    p.add_argument("--modes", help="comma-separated mode specs, e.g. bf16,fp8_e4m3,int4:rot=none,int4,"
                   "int4:b=16,int4:v,int4:g=32,int4:keep=0.1,int4:q8 (default: a sweep for the model's head_dim)")
    p.add_argument("--quick", action="store_true", help="only bf16, fp8_e4m3, naive int4, default int4")
    p.add_argument("--bf16-layers", default="", help="layers kept in BF16 by every quantized mode, e.g. 0,1")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="model compute dtype")
    p.add_argument("--server", action="append", default=[], metavar="LABEL=URL",
                   help="score through a running SGLang server too (repeatable; a label starting with "
                        "'bf16' is the top-1 reference)")
    p.add_argument("--server-step", type=int, default=0,
                   help="tokens per server request; each request extends the cached prefix "
                        "(1: decode-like; default 0: one request per window)")
    p.add_argument("--server-concurrency", type=int, default=8,
                   help="windows scored at once per server (each window's requests stay in order)")
    p.add_argument("--no-sim", action="store_true", help="skip the simulation engine (servers only)")
    p.add_argument("--out", default="eval-out", help="folder for results.json and eval.png")
    return p


def _mode_row(m, nl, kvh, hd, metrics) -> dict:
    f = m.fmt
    bpt = m.bytes_per_token(kvh, nl, hd)
    return {
        "engine": "sim", "spec": m.spec, "label": m.label, "kind": m.kind,
        "bytes_per_token": bpt, "compression": 2 * nl * kvh * hd * 2 / bpt,
        "rotation": f.rotation if f else None,
        "block_size": f.block_size if f and f.rotation == "hadamard" else None,
        "group_size": f.group_size if f else None,
        "rotate_v": bool(f and f.v_rotated), "keep_layers": sorted(m.keep_layers),
        "q_int8": m.q_int8, **metrics,
    }


def summary(rows: list[dict]) -> list[str]:
    sim = {r["spec"]: r for r in rows if r["engine"] == "sim"}
    out = []
    if {"bf16", "int4", "int4:rot=none"} <= sim.keys():
        b, d, n = sim["bf16"]["ppl"], sim["int4"]["ppl"], sim["int4:rot=none"]["ppl"]
        if n > b:
            out.append(f"default int4 closes {100 * (n - d) / (n - b):.1f}% of naive int4's perplexity gap "
                       f"(BF16 {b:.4f}, naive {n:.4f}, default {d:.4f}) at {sim['int4']['compression']:.2f}x")
    quant = [r for r in sim.values() if r["kind"] != "bf16" and not r.get("q_int8")]  # formats only
    for lvl in sorted(quant, key=lambda r: r["bytes_per_token"]):
        best = min((r for r in quant if r["bytes_per_token"] <= lvl["bytes_per_token"]), key=lambda r: r["kl"])
        line = (f"best KL at <= {lvl['bytes_per_token']} B/token ({lvl['compression']:.2f}x smaller than BF16): "
                f"{best['label']} (KL {best['kl']:.5f}, PPL {best['ppl']:.4f})")
        if line not in out:
            out.append(line)
    return out


def _add_dppl(rows) -> None:
    """Perplexity minus the same engine's bf16 row (None without one)."""
    base = {r["engine"].split()[0]: r["ppl"] for r in rows if r["spec"].startswith("bf16")}
    for r in rows:
        b = base.get(r["engine"].split()[0])
        r["dppl"] = r["ppl"] - b if b is not None else None


def check_args(p: argparse.ArgumentParser, args) -> list[int]:
    """What needs no model: numbers, the text file, the mode specs. -> the kept layers."""
    for flag, value, least in (("--tokens", args.tokens, 1), ("--ctx", args.ctx, 2),
                               ("--server-step", args.server_step, 0),
                               ("--server-concurrency", args.server_concurrency, 1)):
        if value < least:
            p.error(f"{flag} {value}: must be at least {least}")
    if args.text and not os.path.isfile(args.text):
        p.error(f"--text {args.text}: no such file")
    try:
        keep = [int(i) for i in args.bf16_layers.split(",") if i.strip()]
    except ValueError:
        p.error(f"--bf16-layers {args.bf16_layers!r}: want layer numbers, e.g. 0,1")
    for spec in (args.modes.split(",") if args.modes else []):
        try:
            check_spec(spec)
        except ValueError as e:
            p.error(str(e))
    return keep


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    keep = check_args(p, args)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    # Config, modes, tokenizer and text first: a bad request ends before the weights load.
    try:
        nl, kvh, hd = models.kv_shape(models.load_config(args.model))
        specs = args.modes.split(",") if args.modes else default_specs(hd, args.quick)
        modes = [parse_mode(s, hd, keep) for s in specs]
        tok = models.load_tokenizer(args.model)
        body, source = text.load_text(args.text, args.dataset, args.dataset_split, args.dataset_column)
    except (ImportError, OSError, ValueError) as e:
        fail(PROG, e)
    wins = text.windows(tok, body, args.ctx, args.tokens)
    scored = sum(len(w) - 1 for w in wins)
    if scored < args.tokens:
        fail(PROG, f"--tokens {args.tokens}: {args.text or args.dataset or 'the bundled text'} gives only "
                   f"{scored} scored tokens at --ctx {args.ctx}; ask for --tokens {scored} or fewer, or "
                   "give a longer --text / --dataset")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .hook import register

    print(f"loading {args.model} ...", file=sys.stderr)
    model = models.load_model(args.model, args.device, dtype, register())
    print(f"{args.model}: {nl} layers, {kvh} KV heads, head_dim {hd}; {len(wins)} windows of <= {args.ctx} "
          f"tokens from {source}; load {time.time() - t0:.0f}s", file=sys.stderr)

    rows = []
    if not args.no_sim:
        from .score import simulate

        with tqdm(total=len(wins) * len(modes), desc="simulated KV modes", unit="pass") as bar:
            tallies = simulate(model, wins, modes, args.device, bar)
        rows = [_mode_row(m, nl, kvh, hd, tallies[m.spec].metrics()) for m in modes]
    meta = {"model": args.model, "layers": nl, "kv_heads": kvh, "head_dim": hd, "text": source,
            "windows": len(wins), "ctx": args.ctx, "scored_tokens": sum(len(w) - 1 for w in wins),
            "device": args.device, "dtype": args.dtype,
            "simulation": "every K (after RoPE) and V of every position round-tripped through the mode, "
                          "the current token's own included (decode-like)"}
    if args.server:
        from . import server

        if rows:  # keep the simulation if the server phase fails or is cut short
            _add_dppl(rows)
            report.write_json(out / "results.json", {**meta, "partial": "servers not scored yet"}, rows)

        servers = [s.partition("=")[::2] if "=" in s else (f"server{i}", s) for i, s in enumerate(args.server)]
        servers.sort(key=lambda s: not s[0].startswith("bf16"))  # the reference first
        step = args.server_step or args.ctx
        # Servers are independent: score them all at once (windows in parallel too).
        with tqdm(total=len(wins) * len(servers), desc="servers", unit="window") as bar, \
                ThreadPoolExecutor(len(servers)) as pool:
            scored = list(pool.map(lambda s: server.score(s[1], wins, step, progress=bar,
                                                          concurrency=args.server_concurrency),
                                   servers))
        ref_tops = next((tops for (label, _), (_, tops) in zip(servers, scored)
                         if label.startswith("bf16")), None)
        for (label, url), (tally, tops) in zip(servers, scored):
            if tops is ref_tops:
                tally.agree, tally.agree_n = tally.n, tally.n
            elif ref_tops is not None:
                server.add_agreement(tally, tops, ref_tops)
            comp = server.kv_compression(url)
            rows.append({"engine": f"server {label}", "spec": label, "label": label, "kind": "server",
                         "bytes_per_token": round(2 * nl * kvh * hd * 2 / comp) if comp else None,
                         "compression": comp, "url": url,
                         "server_step": args.server_step or args.ctx, **tally.metrics()})
    _add_dppl(rows)
    meta["seconds"] = round(time.time() - t0, 1)
    table = report.markdown(rows)
    notes = summary(rows)
    print(f"\n## KV-cache accuracy: {args.model} (head_dim {hd}), {meta['scored_tokens']} tokens, "
          f"windows of {args.ctx}\n\nText: {source}\n\n{table}\n")
    for n in notes:
        print(f"- {n}")
    meta["summary"] = notes
    report.write_json(out / "results.json", meta, rows)
    png = out / "eval.png"
    wrote = rows and report.plot(png, rows, f"{args.model}, head_dim {hd}, {meta['scored_tokens']} tokens")
    print(f"\nwrote {out / 'results.json'}" + (f" and {png}" if wrote else " (no plot: matplotlib missing)")
          + f" in {meta['seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
