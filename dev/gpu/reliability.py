"""Reliability suite for a SAW-INT4 server (run on a GPU host; not collected by pytest).

    python dev/gpu/reliability.py --model /tmp/models/smollm2-135m-instruct \
        --duration 900 --out reliability.json

Phases, all against servers it starts itself on 127.0.0.1 (stopped on exit,
Ctrl-C or error):
 1. probes: fixed greedy requests on the idle server (the reference outputs). Each
    compared run first warms the prompts (one token each), so every run reads its
    prompt from the radix cache; the first run on the fresh server (every prompt a
    miss) must give the same outputs as the hits: an extend attends its own chunk
    through the quantised pool (DEQUANT_MAX_TOKENS in patches/int4_attention.py), as a hit
    reads it back;
 2. soak: mixed traffic (short, long, shared-prefix, streamed) at a concurrency
    far past the KV pool (small --max-total-tokens: requests queue and get
    retracted) for --duration seconds, probes re-run during it; no crash, no
    error responses; once idle, the pool's used-token count back to its start;
 3. probes again (must equal the idle reference);
 4. faults: client disconnect mid-stream, /abort_request, over-long prompt,
    invalid sampling params, empty prompt, each beside witness requests;
 5. numerics: a copy of the model with one layer's k_proj scaled 100x, served
    with SAW-INT4 and with stock BF16 KV: logprobs finite, and how far apart.
Prints a table and writes JSON to --out. Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from saw_sglang.bench.server import ManagedServer, ServerStartError, http_json, reserve_port

# ---------------------------------------------------------------- traffic


@dataclass
class TrafficMix:
    """Request shapes of the soak. Token ids are drawn from [id_lo, id_hi)."""
    short_in: tuple = (16, 200)
    short_out: tuple = (16, 128)
    long_in: tuple = (1200, 2500)
    long_out: tuple = (64, 256)
    prefix_len: int = 1024
    n_prefixes: int = 4
    suffix_in: tuple = (8, 64)
    shared_out: tuple = (32, 128)
    weights: Dict[str, float] = field(default_factory=lambda: {
        "short": 0.35, "long": 0.2, "shared": 0.3, "stream": 0.15})
    id_lo: int = 1000
    id_hi: int = 20000


class Traffic:
    """Seeded request generator. Shared-prefix requests reuse one of a few long
    prefixes so the radix cache gets hits; everything is greedy or seeded."""

    def __init__(self, mix: TrafficMix, seed: int = 0):
        self.mix = mix
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        prng = random.Random(seed + 1)
        self.prefixes = [self._ids(prng, mix.prefix_len) for _ in range(mix.n_prefixes)]

    def _ids(self, rng, n):
        return [rng.randrange(self.mix.id_lo, self.mix.id_hi) for _ in range(n)]

    def next(self) -> dict:
        m = self.mix
        with self.lock:
            r = self.rng
            kind = r.choices(list(m.weights), weights=list(m.weights.values()))[0]
            if kind == "long":
                ids, out = self._ids(r, r.randint(*m.long_in)), r.randint(*m.long_out)
            elif kind == "shared":
                ids = self.prefixes[r.randrange(len(self.prefixes))] + self._ids(r, r.randint(*m.suffix_in))
                out = r.randint(*m.shared_out)
            else:  # short, stream
                ids, out = self._ids(r, r.randint(*m.short_in)), r.randint(*m.short_out)
            temp = 0.0 if r.random() < 0.5 else 0.8
        sp = {"max_new_tokens": out, "temperature": temp}
        if temp > 0:
            sp["sampling_seed"] = r.randrange(1 << 30)
        return {"kind": kind, "input_ids": ids, "sampling_params": sp, "stream": kind == "stream"}


def probe_requests(n: int = 6, seed: int = 1234, out_len: int = 48, id_range=(1000, 20000)) -> List[dict]:
    """Fixed greedy requests (short and long) whose outputs must not change."""
    r = random.Random(seed)
    reqs = []
    for i in range(n):
        length = r.randint(20, 120) if i % 2 == 0 else r.randint(600, 1500)
        reqs.append({"input_ids": [r.randrange(*id_range) for _ in range(length)],
                     "sampling_params": {"max_new_tokens": out_len, "temperature": 0.0},
                     "return_logprob": True})
    return reqs


# ---------------------------------------------------------------- HTTP


def generate(url: str, payload: dict, timeout: float = 600.0) -> tuple:
    """POST /generate; returns (status, body). Streams are read to the end."""
    body = {k: v for k, v in payload.items() if k != "kind"}
    if not body.get("stream"):
        return http_json(url + "/generate", body, timeout=timeout)
    return stream_generate(url, body, timeout)


def stream_generate(url: str, body: dict, timeout: float, disconnect_after: Optional[int] = None):
    """Streamed /generate. With disconnect_after=k, close the socket after k chunks."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/generate", json.dumps(dict(body, stream=True)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text
        last, chunks = None, 0
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            last = json.loads(data)
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after:
                return 499, {"disconnected_after_chunks": chunks}
        return 200, last
    finally:
        conn.close()


def classify(status: int, body) -> tuple:
    """('ok' | 'aborted' | 'client_error' | 'server_error', message)."""
    if status == 200 and isinstance(body, dict):
        fr = (body.get("meta_info") or {}).get("finish_reason") or {}
        kind = fr.get("type") if isinstance(fr, dict) else fr
        if kind == "abort":
            return "aborted", str(fr.get("message", ""))[:200]
        if kind in ("length", "stop") and "text" in body:
            return "ok", ""
        return "server_error", f"200 without a finish: {str(body)[:200]}"
    msg = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(msg, dict):
        msg = msg.get("message", msg)
    kind = "client_error" if 400 <= status < 500 else "server_error"
    return kind, f"{status}: {str(msg)[:200]}"


def output_of(body: dict) -> dict:
    """Token ids and logprobs of a /generate answer."""
    meta = body.get("meta_info") or {}
    lps = [x[0] for x in meta.get("output_token_logprobs") or []]
    ids = body.get("output_ids") or [x[1] for x in meta.get("output_token_logprobs") or []]
    return {"ids": list(ids), "logprobs": lps, "text": body.get("text", "")}


def compare(ref: List[dict], got: List[dict]) -> dict:
    """Exact-match count and shortest common prefix between two probe runs."""
    same, prefix = 0, []
    for a, b in zip(ref, got):
        n = 0
        while n < min(len(a["ids"]), len(b["ids"])) and a["ids"][n] == b["ids"][n]:
            n += 1
        prefix.append(n)
        same += int(a["ids"] == b["ids"])
    return {"identical": same, "of": len(ref), "min_common_prefix": min(prefix) if prefix else 0}


def loads(url: str) -> dict:
    status, body = http_json(url + "/v1/loads?include=core", timeout=10)
    if status != 200:
        raise RuntimeError(f"/v1/loads answered {status}")
    return body["loads"][0]


def warm(url: str, reqs: List[dict]) -> None:
    """Send each prompt for one token, so that the next run reads it from the radix cache.

    A miss attends the prompt's chunk through the pool just after writing it, a hit reads
    the same values back, so the two agree; compared runs are still all hits (like for
    like), and main_phases checks the misses against them."""
    for p in reqs:
        one = dict(p, sampling_params={**p["sampling_params"], "max_new_tokens": 1})
        status, body = generate(url, one)
        kind, msg = classify(status, body)
        if kind != "ok":
            raise RuntimeError(f"probe warm-up failed: {msg}")


def run_probes(url: str, reqs: List[dict], cached: bool = True) -> List[dict]:
    """The probes' outputs, one request at a time; `cached`: prompts warmed first."""
    if cached:
        warm(url, reqs)
    outs = []
    for p in reqs:
        status, body = generate(url, p)
        kind, msg = classify(status, body)
        if kind != "ok":
            raise RuntimeError(f"probe failed: {msg}")
        outs.append(output_of(body))
    return outs


def wait_idle(url: str, timeout: float = 180.0) -> dict:
    """Wait until nothing runs or waits; return the load snapshot then."""
    t0 = time.monotonic()
    while True:
        ld = loads(url)
        if ld.get("num_running_reqs", 0) == 0 and ld.get("num_waiting_reqs", 0) == 0:
            time.sleep(1.0)  # let the scheduler free the last slots
            return loads(url)
        if time.monotonic() - t0 > timeout:
            return ld
        time.sleep(0.5)


# ---------------------------------------------------------------- phases


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    load: str = ""


def soak(url: str, srv, traffic: Traffic, duration: float, concurrency: int,
         probes: List[dict], ref: List[dict], probe_every: float) -> tuple:
    """Closed-loop workers until the deadline; a monitor polls /v1/loads."""
    deadline = time.monotonic() + duration
    stats = {"requests": 0, "ok": 0, "tokens_out": 0, "errors": [], "by_kind": {},
             "max_used_tokens": 0, "max_waiting": 0, "max_running": 0, "probe_runs": [],
             "load_poll_errors": 0, "load_poll_error": ""}
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        while time.monotonic() < deadline and not stop.is_set():
            req = traffic.next()
            try:
                status, body = generate(url, req)
                kind, msg = classify(status, body)
            except Exception as e:  # connection refused/reset: the server is in trouble
                kind, msg = "server_error", f"{type(e).__name__}: {e}"
            with lock:
                stats["requests"] += 1
                stats["by_kind"][req["kind"]] = stats["by_kind"].get(req["kind"], 0) + 1
                if kind == "ok":
                    stats["ok"] += 1
                    stats["tokens_out"] += (body.get("meta_info") or {}).get("completion_tokens", 0)
                else:
                    stats["errors"].append(f"{req['kind']}: {kind} {msg}")
            if kind == "server_error" and not srv.alive():
                stop.set()

    def monitor():
        # A soak shorter than probe_every still gets one probe run, half way.
        next_probe = time.monotonic() + min(probe_every, duration / 2)
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ld = loads(url)
                stats["max_used_tokens"] = max(stats["max_used_tokens"], ld.get("num_used_tokens", 0))
                stats["max_waiting"] = max(stats["max_waiting"], ld.get("num_waiting_reqs", 0))
                stats["max_running"] = max(stats["max_running"], ld.get("num_running_reqs", 0))
            except Exception as e:  # kept: maxima of 0 mean nothing if every poll failed
                stats["load_poll_errors"] += 1
                stats["load_poll_error"] = f"{type(e).__name__}: {e}"
            if time.monotonic() >= next_probe:
                try:
                    stats["probe_runs"].append(compare(ref, run_probes(url, probes)))
                except Exception as e:
                    stats["errors"].append(f"probe during soak: {e}")
                next_probe = time.monotonic() + probe_every
            stop.wait(1.0)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    threads.append(threading.Thread(target=monitor, daemon=True))
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(1.0)
    except KeyboardInterrupt:
        stop.set()
        raise
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def witness_run(url: str, probes: List[dict], ref: List[dict], action) -> tuple:
    """Run `action()` while the witness probes run beside it; (action result, comparison)."""
    warm(url, probes)
    with ThreadPoolExecutor(len(probes) + 1) as ex:
        futs = [ex.submit(generate, url, p) for p in probes]
        time.sleep(0.2)
        res = action()
        outs = []
        for f in futs:
            status, body = f.result()
            kind, msg = classify(status, body)
            outs.append(output_of(body) if kind == "ok" else {"ids": [], "logprobs": [], "error": msg})
    return res, compare(ref, outs)


def faults(url: str, srv, probes: List[dict], ref: List[dict], info: dict, strict: bool) -> List[Check]:
    """Each fault beside witness requests: clear error or clean stop, witnesses unchanged."""
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(1000, 20000) for _ in range(n)]  # noqa: E731
    long_gen = {"input_ids": ids(64), "sampling_params": {"max_new_tokens": 2000, "temperature": 0.0,
                                                          "ignore_eos": True}}
    max_in = int(info.get("max_req_input_len") or info.get("context_length") or 8192)

    def disconnect():
        return stream_generate(url, long_gen, 120, disconnect_after=3)

    def abort():
        rid = f"reliability-abort-{time.monotonic_ns()}"
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(generate, url, dict(long_gen, rid=rid))
            time.sleep(1.0)
            st, _ = http_json(url + "/abort_request", {"rid": rid}, timeout=30)
            status, body = fut.result()
        return status, body, st

    cases = [
        ("client disconnects mid-stream", disconnect, {"disconnect"}),
        ("/abort_request of a running request", abort, {"aborted", "client_error"}),
        (f"over-long prompt ({max_in + 64} tokens)",
         lambda: generate(url, {"input_ids": ids(max_in + 64), "sampling_params": {"max_new_tokens": 8}}),
         {"client_error"}),
        ("invalid sampling params (temperature -1)",
         lambda: generate(url, {"input_ids": ids(16), "sampling_params": {"temperature": -1.0}}),
         {"client_error"}),
        ("invalid sampling params (top_p 0)",
         lambda: generate(url, {"input_ids": ids(16), "sampling_params": {"top_p": 0.0}}),
         {"client_error"}),
        ("empty prompt (text '')",
         lambda: generate(url, {"text": "", "sampling_params": {"max_new_tokens": 8}}),
         {"client_error", "ok"}),
        ("empty prompt (input_ids [])",
         lambda: generate(url, {"input_ids": [], "sampling_params": {"max_new_tokens": 8}}),
         {"client_error", "ok"}),
    ]
    checks = []
    for name, action, accepted in cases:
        try:
            res, cmp = witness_run(url, probes, ref, action)
            if name.startswith("client disconnects"):
                kind, msg = ("disconnect", f"closed after {res[1].get('disconnected_after_chunks')} chunks") \
                    if res[0] == 499 else classify(*res)
            elif name.startswith("/abort"):
                kind, msg = classify(res[0], res[1])
                msg = f"abort call {res[2]}; request -> {kind} {msg}".strip()
            else:
                kind, msg = classify(*res)
        except Exception as e:
            kind, msg, cmp = "exception", f"{type(e).__name__}: {e}", {"identical": 0, "of": len(probes)}
        healthy = srv.alive() and http_json(url + "/health", timeout=30)[0] == 200
        witnesses_ok = cmp["identical"] == cmp["of"]
        ok = kind in accepted and healthy and (witnesses_ok or not strict)
        wtxt = f"witnesses {cmp['identical']}/{cmp['of']} identical"
        if not witnesses_ok:
            wtxt += f" (common prefix >= {cmp.get('min_common_prefix', 0)} tokens)"
        checks.append(Check(f"fault: {name}", ok, f"{kind}: {msg}; {wtxt}" + ("" if healthy else "; SERVER DOWN")))
    return checks


# ---------------------------------------------------------------- numerics


def scale_kproj(src: str, dst: str, layer: int, factor: float) -> List[str]:
    """Copy a safetensors checkpoint, scaling layer `layer`'s k_proj weight (and bias) by
    `factor`. Other files are copied as they are. Returns the scaled tensor names."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_p, dst_p = Path(src), Path(dst)
    dst_p.mkdir(parents=True, exist_ok=True)
    prefix = f"layers.{layer}.self_attn.k_proj."
    scaled = []
    for f in src_p.iterdir():
        if f.is_dir():
            continue
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst_p / f.name)
            continue
        tensors, meta = {}, None
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
            for k in sf.keys():
                t = sf.get_tensor(k)
                if prefix in k and (k.endswith("weight") or k.endswith("bias")):
                    t = (t.float() * factor).to(t.dtype)
                    if not torch.isfinite(t).all():
                        raise ValueError(f"{k} x{factor:g} overflows {t.dtype}")
                    scaled.append(k)
                tensors[k] = t.contiguous()
        save_file(tensors, str(dst_p / f.name), metadata=meta)
    if not scaled:
        raise ValueError(f"no '{prefix}' tensors in {src}")
    return sorted(scaled)


def numerics_compare(a: List[dict], b: List[dict]) -> dict:
    """Finite checks and distance between two probe runs (a: SAW-INT4, b: BF16 KV)."""
    finite = all(math.isfinite(x) for o in a for x in o["logprobs"] if x is not None)
    n_lp = sum(len(o["logprobs"]) for o in a)
    cmp = compare(b, a)
    diffs = []
    for x, y in zip(a, b):
        for i in range(min(len(x["ids"]), len(y["ids"]))):
            if x["ids"][i] != y["ids"][i]:
                break
            if x["logprobs"][i] is not None and y["logprobs"][i] is not None:
                diffs.append(abs(x["logprobs"][i] - y["logprobs"][i]))
    agree = sum(1 for x, y in zip(a, b) for i, j in zip(x["ids"], y["ids"]) if i == j)
    total = sum(min(len(x["ids"]), len(y["ids"])) for x, y in zip(a, b))
    return {"finite": finite and n_lp > 0, "logprobs": n_lp, **cmp,
            "token_agreement": agree / total if total else 0.0,
            "mean_abs_logprob_diff_common_prefix": sum(diffs) / len(diffs) if diffs else None}


# ---------------------------------------------------------------- main


def server_cmd(args, launcher: str, kv_args: str, model: str, port: int) -> List[str]:
    cmd = shlex.split(launcher.replace("{python}", shlex.quote(sys.executable)))
    cmd += ["--model-path", model, "--host", "127.0.0.1", "--port", str(port),
            "--max-total-tokens", str(args.max_total_tokens),
            "--mem-fraction-static", str(args.mem_fraction_static)]
    if args.attention_backend:
        cmd += ["--attention-backend", args.attention_backend]
    return cmd + shlex.split(kv_args) + shlex.split(args.server_args)


def start(args, name: str, launcher: str, kv_args: str, model: str) -> ManagedServer:
    """A server to use as a context manager: `with start(...) as srv:` starts it,
    waits for /health and stops its process group on the way out."""
    port = reserve_port()
    srv = ManagedServer(server_cmd(args, launcher, kv_args, model, port), "127.0.0.1", port,
                        str(Path(args.log_dir) / f"server-{name}.log"), start_timeout_s=args.start_timeout)
    print(f"[{name}] starting: {' '.join(srv.cmd)}", flush=True)
    return srv


def count_retractions(log_path: str) -> int:
    try:
        return Path(log_path).read_text(errors="replace").count("Retract requests")
    except OSError:
        return 0


def main_phases(args, report: dict) -> List[Check]:
    checks: List[Check] = []
    probes = probe_requests(args.probes)
    # The numerics servers run beside the soak (their own pools; see --mem-fraction-static).
    numerics_job = None
    if not args.skip_numerics:
        numerics_job = ThreadPoolExecutor(1).submit(numerics, args, probes, report)
    stock = None
    if not args.skip_stock_baseline:
        # The same miss-vs-hit probes on a stock BF16 server: a hit recomputes only the last
        # prompt token (a one-row GEMM where the miss ran an N-row one), so greedy outputs
        # can differ there too; that is the floor an INT4 server is held to.
        with start(args, "stock-bf16", args.stock_launcher, args.stock_args, args.model) as ssrv:
            stock = compare(run_probes(ssrv.url, probes, cached=False), run_probes(ssrv.url, probes))
        report["stock_miss_vs_hit"] = stock
    with start(args, "saw-int4", args.saw_launcher, args.saw_args, args.model) as srv:
        url = srv.url
        info = srv.server_info()
        report["server_info"] = {k: info.get(k) for k in ("max_total_num_tokens", "max_req_input_len",
                                                          "kv_cache_dtype", "context_length", "version")}
        base = wait_idle(url)
        miss = run_probes(url, probes, cached=False)  # fresh server: every prompt a cache miss
        ref = run_probes(url, probes)
        again = run_probes(url, probes)
        c = compare(ref, again)
        checks.append(Check("determinism: idle, twice", c["identical"] == c["of"], f"{c['identical']}/{c['of']}"))
        c = compare(miss, ref)
        checks.append(miss_vs_hit_check(c, stock, args.strict))

        traffic = Traffic(TrafficMix(), seed=args.seed)
        st = soak(url, srv, traffic, args.duration, args.concurrency, probes, ref, args.probe_every)
        st["retractions_logged"] = count_retractions(srv.log_path)
        report["soak"] = {k: (v[:50] if k == "errors" else v) for k, v in st.items()}
        load = (f"{st['requests']} req in {st['seconds']} s at {args.concurrency} conc.; pool "
                f"{base.get('max_total_num_tokens') or info.get('max_total_num_tokens')} tok, max used "
                f"{st['max_used_tokens']}, max waiting {st['max_waiting']}, retractions {st['retractions_logged']}"
                + (f"; {st['load_poll_errors']} load polls failed ({st['load_poll_error']})"
                   if st["load_poll_errors"] else ""))
        checks.append(Check("soak: server alive", srv.alive(), "" if srv.alive() else srv.log_tail(5), load))
        checks.append(Check("soak: no error responses", not st["errors"] and st["ok"] > 0,
                            f"{st['ok']}/{st['requests']} ok; " + "; ".join(st["errors"][:3]), load))
        if args.require_queueing:
            checks.append(Check("soak: pool saturated (requests queued)", st["max_waiting"] > 0,
                                f"max waiting {st['max_waiting']}"))
        during = st["probe_runs"]
        same = sum(r["identical"] for r in during)
        total = sum(r["of"] for r in during)
        checks.append(Check("determinism: during soak", bool(during) and (same == total or not args.strict),
                            f"{same}/{total} identical over {len(during)} runs; min common prefix "
                            f"{min((r['min_common_prefix'] for r in during), default=0)} tok"
                            + ("" if same == total else " (batch composition differs from idle)")))
        idle = wait_idle(url)
        checks.append(Check("pool: used tokens back to start once idle",
                            idle.get("num_used_tokens") == base.get("num_used_tokens")
                            and idle.get("num_running_reqs", 0) == 0,
                            f"start {base.get('num_used_tokens')}, end {idle.get('num_used_tokens')}, "
                            f"running {idle.get('num_running_reqs')}, waiting {idle.get('num_waiting_reqs')}"))
        c = compare(ref, run_probes(url, probes))
        checks.append(Check("determinism: after soak", c["identical"] == c["of"],
                            f"{c['identical']}/{c['of']} (min common prefix {c['min_common_prefix']})"))

        checks += faults(url, srv, probes[:2], ref[:2], info, args.strict)
        idle = wait_idle(url)
        checks.append(Check("pool: used tokens back to start after faults",
                            idle.get("num_used_tokens") == base.get("num_used_tokens"),
                            f"start {base.get('num_used_tokens')}, end {idle.get('num_used_tokens')}"))
        checks.append(Check("server alive at the end", srv.alive()))

    if numerics_job is not None:
        checks += numerics_job.result()
    return checks


def numerics(args, probes, report) -> List[Check]:
    copy = Path(args.log_dir) / f"model-kproj-x{args.scale:g}-layer{args.scale_layer}"
    names = scale_kproj(args.model, str(copy), args.scale_layer, args.scale)
    servers = {name: start(args, f"numerics-{name}", launcher, kv, str(copy))
               for name, launcher, kv in (("saw-int4", args.saw_launcher, args.saw_args),
                                          ("bf16", args.stock_launcher, args.stock_args))}
    try:
        for srv in servers.values():
            srv.start()
        outs = {}
        for name, srv in servers.items():
            srv.wait_healthy()
            outs[name] = run_probes(srv.url, probes, cached=False)
    finally:
        for srv in servers.values():
            srv.stop()
    r = numerics_compare(outs["saw-int4"], outs["bf16"])
    report["numerics"] = {"scaled": names, "factor": args.scale, **r}
    if not args.keep_model_copy:
        shutil.rmtree(copy, ignore_errors=True)
    lp = r["mean_abs_logprob_diff_common_prefix"]
    return [Check(f"numerics: k_proj x{args.scale:g} (layer {args.scale_layer}), logprobs finite",
                  r["finite"], f"{r['logprobs']} logprobs"),
            Check("numerics: SAW-INT4 vs BF16 KV on the scaled copy (reported)", True,
                  f"token agreement {r['token_agreement']:.3f}, identical {r['identical']}/{r['of']}, "
                  f"mean |dlogprob| {lp:.4f}" if lp is not None else "no common tokens")]


def miss_vs_hit_check(int4: dict, stock: Optional[dict], strict: bool) -> Check:
    """All probes identical passes; short of that, no fewer than the stock BF16 server's
    (unless --strict), since a hit's one-row recompute differs from a miss there too."""
    ok = int4["identical"] == int4["of"] or (
        not strict and stock is not None and int4["identical"] >= stock["identical"])
    detail = (f"{int4['identical']}/{int4['of']} identical, min common prefix {int4['min_common_prefix']} tok"
              + ("" if stock is None else f"; stock BF16 server {stock['identical']}/{stock['of']} "
                 f"(min common prefix {stock['min_common_prefix']} tok)"))
    return Check("radix miss vs hit: same greedy outputs", ok, detail)


def table(checks: List[Check]) -> str:
    w = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(w)}  result  detail", "-" * (w + 40)]
    for c in checks:
        lines.append(f"{c.name.ljust(w)}  {'PASS' if c.ok else 'FAIL':6s}  {c.detail}")
        if c.load:
            lines.append(f"{''.ljust(w)}          load: {c.load}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="/tmp/models/smollm2-135m-instruct")
    p.add_argument("--duration", type=float, default=900.0, help="soak seconds")
    p.add_argument("--concurrency", type=int, default=64, help="soak client threads")
    p.add_argument("--max-total-tokens", type=int, default=12000,
                   help="KV pool cap: small so the soak queues and retracts")
    # High, since every server caps its pool with --max-total-tokens: SGLang refuses to
    # start when free memory < (1 - fraction) x total, and several servers share the GPU.
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--attention-backend", default="triton")
    p.add_argument("--server-args", default="--disable-piecewise-cuda-graph")
    p.add_argument("--saw-launcher", default="{python} -m saw_sglang.launch_server")
    p.add_argument("--saw-args", default="--kv-cache-dtype int4")
    p.add_argument("--stock-launcher", default="{python} -m sglang.launch_server")
    p.add_argument("--stock-args", default="--kv-cache-dtype bf16")
    p.add_argument("--probes", type=int, default=6)
    p.add_argument("--probe-every", type=float, default=60.0, help="seconds between probe runs in the soak")
    p.add_argument("--strict", action="store_true",
                   help="probes during load and fault witnesses must match the idle outputs exactly")
    p.add_argument("--require-queueing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--scale-layer", type=int, default=0)
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--skip-stock-baseline", action="store_true",
                   help="do not run the miss-vs-hit probes on a stock BF16 server first")
    p.add_argument("--keep-model-copy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default="reliability-logs")
    p.add_argument("--out", default="reliability.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.monotonic()
    try:
        checks = main_phases(args, report)
    except ServerStartError as e:
        checks = [Check("server start", False, str(e).splitlines()[0])]
    except KeyboardInterrupt:
        checks = [Check("interrupted", False, "Ctrl-C: servers stopped")]
    except Exception as e:  # report what broke instead of a bare traceback
        checks = [Check("suite", False, f"{type(e).__name__}: {e}")]
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["checks"] = [asdict(c) for c in checks]
    report["passed"] = all(c.ok for c in checks)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(table(checks))
    print(f"\n{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s; JSON in {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
