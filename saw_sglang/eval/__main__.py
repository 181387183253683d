"""python -m saw_sglang.eval: teacher-forced accuracy of KV-cache modes, and which one
to run for your model.

Simulation engine (default): a transformers model whose attention round-trips every
K (after RoPE) and V through the mode's cache format (kernels/reference.py for
INT4) before SDPA, decode-like, over the bundled held-out texts (prose, source code,
technical docs, Q&A, dialogue; saw_sglang/eval/data/SOURCES.md). Reported per text
and on average: the share of naive INT4's perplexity gap each mode closes, with the
noise of the sample (bootstrap over windows); the last line recommends a mode and
its server flags. Server engine (--server): prompt logprobs from running SGLang
servers over the same token windows."""

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
from saw_sglang.kernels.calibration import KCalibration
from saw_sglang.kv_modes import GRAMMAR, parse, parse_list

from . import models, report, text
from .modes import build, default_specs
from .stats import BF16, NAIVE, gap_table, recommend

CALIBRATION_FILE = "k-calibration.pt"
PROG = "python -m saw_sglang.eval"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, epilog=GRAMMAR, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="preset (smollm2-135m, gemma3-270m), a .gguf file, or any HF causal LM folder / hub name "
                        "(the tokenizer for --server too)")
    p.add_argument("--texts", default=",".join(text.BUNDLED),
                   help=f"which bundled texts to score (default: all of {', '.join(text.BUNDLED)})")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="score this UTF-8 file instead of the bundled texts (repeatable)")
    p.add_argument("--dataset", help="HF dataset NAME[:CONFIG] instead (needs network or a local cache)")
    p.add_argument("--dataset-split", default="test")
    p.add_argument("--dataset-column", default="text")
    p.add_argument("--tokens", type=int, default=2048, help="scored tokens per text (default 2048)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per teacher-forced window (default 256)")
    p.add_argument("--context", type=int, default=None,
                   help="windows start at positions spread over [0, CONTEXT), as a server's keys sit "
                        "anywhere in its context (default: the model's max positions, at most 32768, "
                        "or 0 with --server, whose requests start at 0; 0: every window at position 0)")
    p.add_argument("--modes", help="comma-separated modes, grammar below (default: the server's default, "
                   "naive INT4 and the levers for the model's head_dim)")
    p.add_argument("--quick", action="store_true",
                   help="only bf16, fp8, naive int4, the default, and the default with a K calibration")
    p.add_argument("--calibration", metavar="FILE",
                   help="a K calibration file for calibration=auto (default: calibrate here on the "
                        "bundled calibration text, and write it to OUT/" + CALIBRATION_FILE + ")")
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
        "engine": "sim", "spec": m.name, "label": m.name, "kind": m.kind,
        "bytes_per_token": bpt, "compression": 2 * nl * kvh * hd * 2 / bpt,
        "rotation": f.rotation if f else None,
        "block_size": f.block_size if f and f.rotation == "hadamard" else None,
        "group_size": f.group_size if f else None, "scale_fit": f.scale_fit if f else None,
        "rotate_v": bool(f and f.v_rotated), "keep_layers": list(m.keep_layers),
        "sink_tokens": m.sink_tokens, "q_int8": m.q_int8, "k_calibration": m.calibration is not None,
        **metrics,
    }


def _add_dppl(rows) -> None:
    """Perplexity minus the same engine's bf16 row (None without one)."""
    base = {r["engine"].split()[0]: r["ppl"] for r in rows if r["spec"].startswith("bf16")}
    for r in rows:
        b = base.get(r["engine"].split()[0])
        r["dppl"] = r["ppl"] - b if b is not None else None


def _pooled(tallies):
    from .score import Tally

    out = Tally()
    for t in tallies:
        for f in ("nll", "kl", "agree", "agree_n", "n"):
            getattr(out, f).extend(getattr(t, f))
    return out


def _texts(args) -> list:
    if args.text:
        return text.from_files(args.text)
    if args.dataset:
        return [text.from_dataset(args.dataset, args.dataset_split, args.dataset_column)]
    return text.bundled([n.strip() for n in args.texts.split(",") if n.strip()])


def check_args(p: argparse.ArgumentParser, args) -> list:
    """What needs no model: numbers, the text files, the mode specs. -> ModeSpecs or None."""
    for flag, value, least in (("--tokens", args.tokens, 1), ("--ctx", args.ctx, 2),
                               ("--server-step", args.server_step, 0),
                               ("--server-concurrency", args.server_concurrency, 1)):
        if value < least:
            p.error(f"{flag} {value}: must be at least {least}")
    for path in args.text:
        if not os.path.isfile(path):
            p.error(f"--text {path}: no such file")
    if args.calibration and not os.path.isfile(args.calibration):
        p.error(f"--calibration {args.calibration}: no such file")
    try:
        return parse_list(args.modes) if args.modes else None
    except ValueError as e:
        p.error(str(e).splitlines()[0])


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    specs = check_args(p, args)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    # Config, modes, tokenizer and texts first: a bad request ends before the weights load.
    try:
        config = models.load_config(args.model)
        nl, kvh, hd = models.kv_shape(config)
        hq = config.get_text_config().num_attention_heads
        if specs is None:
            specs = [parse(s) for s in default_specs(hd, args.quick)]
        # the two ends of the gap first, whether asked for or not
        specs = [parse(BF16), parse(NAIVE)] + [s for s in specs if s.text not in (BF16, NAIVE)]
        for s in specs:  # formats against this head_dim (a stand-in calibration)
            build(s, hd, lambda src: KCalibration.identity(nl, kvh, hd))
        tok = models.load_tokenizer(args.model)
        texts = _texts(args)
    except (ImportError, OSError, ValueError) as e:
        fail(PROG, e)
    wins = {t.name: text.windows(tok, t.body, args.ctx, args.tokens) for t in texts}
    for t in texts:
        scored = sum(len(w) - 1 for w in wins[t.name])
        if scored < args.tokens and (args.text or args.dataset):
            fail(PROG, f"--tokens {args.tokens}: {t.source} gives only {scored} scored tokens at --ctx "
                       f"{args.ctx}; ask for --tokens {scored} or fewer, or give a longer --text / --dataset")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .hook import register

    print(f"loading {args.model} ...", file=sys.stderr)
    model = models.load_model(args.model, args.device, dtype, register())
    from .calibrate import calibrate, context_of

    # with servers, windows start at position 0 as their requests do
    context = (0 if args.server else context_of(model)) if args.context is None else args.context
    cal_path = Path(args.calibration) if args.calibration else out / CALIBRATION_FILE
    cache = {}

    def calibrations(source):
        if source not in cache:
            if source == "auto" and not args.calibration:
                with tqdm(desc="calibrating K (calibration text)", unit="window") as bar:
                    cal = calibrate(model, tok, nl, hq, kvh, context=context or None, device=args.device,
                                    progress=bar)
                cal.without_scale().save(cal_path)  # the shift alone: what the measurements favour
            else:
                cal = KCalibration.load(cal_path if source == "auto" else source)
            if cal.shape != (nl, kvh, hd):
                fail(PROG, f"calibration {source} is for shape {cal.shape}, the model has {(nl, kvh, hd)}: "
                           "make one for this model (python -m saw_sglang.calibrate)")
            cache[source] = cal
        return cache[source]

    modes = [build(s, hd, calibrations) for s in specs]
    print(f"{args.model}: {nl} layers, {kvh} KV heads, head_dim {hd}; texts "
          + ", ".join(f"{n} ({len(w)} windows)" for n, w in wins.items())
          + f" of <= {args.ctx} tokens at positions over [0, {context}); load {time.time() - t0:.0f}s",
          file=sys.stderr)

    rows, table, results = [], None, {}
    if not args.no_sim:
        from .score import simulate

        total = sum(len(w) for w in wins.values()) * len(modes)
        with tqdm(total=total, desc="simulated KV modes", unit="pass") as bar:
            for name, w in wins.items():
                results[name] = simulate(model, w, modes, args.device, bar, context=context)
        rows = [_mode_row(m, nl, kvh, hd, _pooled(results[t][m.name] for t in results).metrics())
                for m in modes]
        table = gap_table(results, [m.name for m in modes])
        for r in rows:
            g, sd = table.mean[r["spec"]]
            r.update(gap_closed_mean=g, gap_closed_noise=sd, gap_closed_worst=table.worst[r["spec"]],
                     gap_closed={t: table.per_text[r["spec"], t][0] for t in table.texts})
    meta = {"model": args.model, "layers": nl, "kv_heads": kvh, "head_dim": hd,
            "texts": {t.name: t.source for t in texts}, "windows": {n: len(w) for n, w in wins.items()},
            "ctx": args.ctx, "context": context,
            "scored_tokens": sum(len(x) - 1 for w in wins.values() for x in w),
            "device": args.device, "dtype": args.dtype,
            "simulation": "every K (after RoPE) and V of every position round-tripped through the mode, "
                          "the current token's own included (decode-like)"}
    if args.server:
        rows += _score_servers(args, wins, rows, out, meta, nl, kvh, hd)
    _add_dppl(rows)
    meta["seconds"] = round(time.time() - t0, 1)
    note = models.WEIGHTS_NOTE.get(args.model) or (
        "weights: GGUF de-quantised ('bf16' = a BF16 KV cache over those weights)" if args.model.endswith(".gguf")
        else None)
    meta["weights"] = note
    print(f"\n## KV-cache accuracy: {args.model} (head_dim {hd}), {meta['scored_tokens']} tokens, "
          f"windows of {args.ctx}\n" + (f"\n{note[0].upper() + note[1:]}.\n" if note else ""))
    line = None
    if table is not None:
        ppl = {t: {m: results[t][m].metrics()["ppl"] for m in (BF16, NAIVE)} for t in results}
        print("Share of naive INT4's perplexity gap closed (%, ± bootstrap std over windows):\n")
        print(report.gap_markdown(table, {r["spec"]: r for r in rows}, ppl) + "\n")
        served = lambda s: s.kind == "int4" and not s.sim  # noqa: E731
        flags = lambda s: " ".join(parse(s.text.replace("calibration=auto", f"calibration={cal_path}"))  # noqa: E731
                                   .server_args())
        line = recommend(table, {r["spec"]: r for r in rows}, args.model, served, flags)
        meta["recommendation"] = line
    print("All texts pooled:\n\n" + report.markdown(rows) + "\n")
    report.write_json(out / "results.json", meta, rows)
    png = out / "eval.png"
    wrote = rows and report.plot(png, table, rows, f"{args.model}, head_dim {hd}, {meta['scored_tokens']} tokens")
    print(f"wrote {out / 'results.json'}" + (f" and {png}" if wrote else " (no plot: matplotlib missing)")
          + f" in {meta['seconds']:.0f}s", file=sys.stderr)
    if line:
        print(line)
    return 0


def _score_servers(args, wins, rows, out, meta, nl, kvh, hd) -> list[dict]:
    from . import server

    if rows:  # keep the simulation if the server phase fails or is cut short
        _add_dppl(rows)
        report.write_json(out / "results.json", {**meta, "partial": "servers not scored yet"}, rows)
    flat = [x for w in wins.values() for x in w]
    # LABEL=URL; a label may hold '=' itself (a mode name such as int4:rotation=none)
    servers = [s.rpartition("=")[::2] if "=" in s else (f"server{i}", s) for i, s in enumerate(args.server)]
    servers.sort(key=lambda s: not s[0].startswith("bf16"))  # the reference first
    step = args.server_step or args.ctx
    # Servers are independent: score them all at once (windows in parallel too).
    with tqdm(total=len(flat) * len(servers), desc="servers", unit="window") as bar, \
            ThreadPoolExecutor(len(servers)) as pool:
        scored = list(pool.map(lambda s: server.score(s[1], flat, step, progress=bar,
                                                      concurrency=args.server_concurrency), servers))
    ref_tops = next((tops for (label, _), (_, tops) in zip(servers, scored) if label.startswith("bf16")), None)
    out_rows = []
    for (label, url), (tally, tops) in zip(servers, scored):
        if tops is ref_tops:
            tally.agree, tally.agree_n = list(tally.n), list(tally.n)
        elif ref_tops is not None:
            server.add_agreement(tally, tops, ref_tops)
        comp = server.kv_compression(url)
        out_rows.append({"engine": f"server {label}", "spec": label, "label": label, "kind": "server",
                         "bytes_per_token": round(2 * nl * kvh * hd * 2 / comp) if comp else None,
                         "compression": comp, "url": url, "server_step": step, **tally.metrics()})
    return out_rows


if __name__ == "__main__":
    sys.exit(main())
