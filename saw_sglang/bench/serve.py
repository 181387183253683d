"""Serving sweep: one server per KV mode, SGLang's bench_serving at each point.

    python -m saw_sglang.bench serve --model-path /path/to/model [--budget]

For each KV mode (bf16, fp8 = stock SGLang; int4[:options] = ours, the grammar of
saw_sglang.kv_modes, e.g. int4:rotation=none:scale-fit=minmax for naive INT4) it
starts the server, waits for /health, runs `sglang.bench_serving` (random-ids,
fixed lengths) at every (scenario, concurrency) point, stops the server (the
whole process group, also on Ctrl-C, errors or a failed start) and goes on.
Writes results.json, results.csv and throughput.png to --out. With --profile,
it also captures N scheduler steps per point with SGLang's torch profiler once
the point's traffic is steady (saw_sglang.bench.capture) and reports GPU kernel
time per decode step by category (saw_sglang.bench.profile): profile.png and a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from saw_sglang.bench import profile as prof
from saw_sglang.bench.capture import ProfileCapture
from saw_sglang.bench.server import ManagedServer, ServerStartError, kill_group, kv_capacity, reserve_port
from saw_sglang.cli import Parser
from saw_sglang.kv_modes import GRAMMAR
from saw_sglang.kv_modes import parse as parse_mode

STOCK = "stock"
OURS = "saw"

NAIVE = "int4:rotation=none:scale-fit=minmax"


def mode_launch(mode: str) -> tuple:
    """A mode (saw_sglang.kv_modes grammar) -> (launcher, server args); ValueError if bad.
    Override the args with --mode-args NAME="..." if they differ."""
    spec = parse_mode(mode)
    return (STOCK if spec.stock else OURS), " ".join(spec.server_args())


# The default sweep, in table order: name -> (launcher, server args).
MODES: Dict[str, tuple] = {m: mode_launch(m) for m in ("bf16", "fp8", NAIVE, "int4")}
DEFAULT_SCENARIOS = ["short:256:1024:32,64,128,256:4", "long:16384:1024:8,16,32,64,128:1"]
# --budget: about 20 min of H200 time (Qwen3-8B shape, 4 modes; 3 modes at 1x prompts took 848 s).
BUDGET_SCENARIOS = ["short:256:1024:32,128:2", "long:16384:1024:64:1"]
# Ratios printed per point: (numerator mode, denominator mode).
RATIOS = [("int4", "bf16"), ("int4", NAIVE)]


def _rank(mode: str) -> int:
    """Table order: the default sweep's, then other modes."""
    return list(MODES).index(mode) if mode in MODES else len(MODES)


@dataclass
class Scenario:
    name: str
    input_len: int
    output_len: int
    concurrencies: List[int]
    prompts_per_concurrency: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Scenario":
        """NAME:IN:OUT:C1,C2,...[:PROMPTS_PER_CONCURRENCY]"""
        parts = spec.split(":")
        if len(parts) not in (4, 5):
            raise argparse.ArgumentTypeError(
                f"scenario {spec!r}: want NAME:IN:OUT:C1,C2[:PROMPTS_PER_CONCURRENCY]")
        try:
            conc = [int(c) for c in parts[3].split(",") if c]
            s = cls(parts[0], int(parts[1]), int(parts[2]), conc,
                    float(parts[4]) if len(parts) == 5 else 1.0)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"scenario {spec!r}: {e}") from None
        if not conc or min(conc) < 1 or s.input_len < 1 or s.output_len < 1:
            raise argparse.ArgumentTypeError(f"scenario {spec!r}: lengths and concurrencies must be >= 1")
        return s

    def num_prompts(self, concurrency: int, min_prompts: int) -> int:
        return max(min_prompts, int(round(self.prompts_per_concurrency * concurrency)))


@dataclass
class Point:
    mode: str
    scenario: str
    input_len: int
    output_len: int
    concurrency: int
    num_prompts: int
    kv_tokens: Optional[int] = None
    completed: Optional[int] = None
    output_tok_s: Optional[float] = None
    mean_ttft_ms: Optional[float] = None
    p90_ttft_ms: Optional[float] = None
    mean_itl_ms: Optional[float] = None
    p90_itl_ms: Optional[float] = None
    duration_s: Optional[float] = None
    error: Optional[str] = None
    # --profile: {"running_reqs", "dir", "error", "breakdown": profile.Breakdown as dict}
    profile: Optional[dict] = None


@dataclass
class Sweep:
    args: dict
    points: List[Point] = field(default_factory=list)
    servers: Dict[str, dict] = field(default_factory=dict)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the mode grammar in the epilog kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m saw_sglang.bench serve",
        description=__doc__.split("\n\n")[0] + " Throughput, TTFT and ITL per KV mode and concurrency.",
        epilog=textwrap.fill("Scenarios: NAME:IN:OUT:C1,C2,...[:K] runs num_prompts = max(--min-prompts, K x C) "
                "at each concurrency C. Defaults: " + " ".join(DEFAULT_SCENARIOS) + ". "
                "--budget uses " + " ".join(BUDGET_SCENARIOS) + " (2x concurrency prompts for short, "
                "1x for long, 3 points instead of 9) and adds --disable-piecewise-cuda-graph: "
                "about 20 min on one H200 for the 4 modes with a Qwen3-8B-shaped dummy model "
                "(1-3 min per server start, one start per mode).", 88)
        + "\n\n" + GRAMMAR.split("simulation only")[0],
        formatter_class=_HelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma list of modes (grammar below; default: " + ",".join(MODES) + ")")
    p.add_argument("--scenario", action="append", type=Scenario.parse, metavar="SPEC",
                   help="repeatable; replaces the default scenarios")
    p.add_argument("--budget", action="store_true", help="the trimmed ~20 min sweep (see below)")
    p.add_argument("--min-prompts", type=int, default=1)
    p.add_argument("--out", default="bench-serve-out")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--mem-fraction-static", type=float, default=0.5)
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="cap the KV pool (tokens) to emulate a smaller GPU")
    p.add_argument("--load-format", default=None, help="e.g. dummy")
    p.add_argument("--attention-backend", default="flashinfer",
                   help="for every mode, so all compare on one backend family (stock SGLang "
                        "picks fa3 on Hopper, which needs sgl_kernel's flash_ops); '' = each "
                        "server's default")
    p.add_argument("--disable-piecewise-cuda-graph", action="store_true")
    p.add_argument("--server-args", default="", help="extra args for every server (one string)")
    p.add_argument("--mode-args", action="append", default=[], metavar="NAME=ARGS",
                   help="replace a mode's KV args (ARGS start with --), e.g. "
                        "int4='--kv-cache-dtype int4 --saw-scale-fit minmax'")
    p.add_argument("--stock-launcher", default="{python} -m sglang.launch_server")
    p.add_argument("--saw-launcher", default="{python} -m saw_sglang.launch_server")
    p.add_argument("--bench-cmd", default="{python} -m sglang.bench_serving",
                   help="client command; sweep flags are appended")
    p.add_argument("--bench-args", default="", help="extra args for every bench_serving run")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the per-point warm-up (bench_serving --warmup-requests: the "
                        "concurrency, capped at 8192 prompt tokens)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--point-timeout", type=float, default=1800.0, help="seconds per bench run")
    p.add_argument("--no-plot", action="store_true")
    g = p.add_argument_group("profiling (GPU time per decode step by kernel category)")
    g.add_argument("--profile", action="store_true",
                   help="at each profiled point, once the traffic is steady, capture --profile-steps "
                        "scheduler steps with SGLang's /start_profile (torch profiler) and report "
                        "kernel ms per step: attention decode/prefill, KV write, GEMM, comm, other")
    g.add_argument("--profile-steps", type=int, default=10, help="scheduler steps per capture")
    g.add_argument("--profile-points", default="", metavar="SCEN:C,...",
                   help="profile only these points, e.g. short:128,long:64; empty: all")
    g.add_argument("--profile-settle", type=float, default=3.0,
                   help="seconds the running-request count must hold before a capture starts when "
                        "it stays below the concurrency (KV pool full)")
    return p


def _fmt_cmd(template: str) -> List[str]:
    return shlex.split(template.replace("{python}", shlex.quote(sys.executable)))


def server_cmd(args, mode: str, port: int) -> List[str]:
    launcher, kv_args = mode_launch(mode)
    # NAME=ARGS where NAME may hold '=' itself (int4:rotation=none): ARGS start with --
    overrides = {m.partition("=--")[0]: "--" + m.partition("=--")[2] for m in args.mode_args}
    kv_args = overrides.get(mode, kv_args)
    cmd = _fmt_cmd(args.saw_launcher if launcher == OURS else args.stock_launcher)
    cmd += ["--model-path", args.model_path, "--host", args.host, "--port", str(port),
            "--mem-fraction-static", str(args.mem_fraction_static)]
    if args.max_total_tokens:
        cmd += ["--max-total-tokens", str(args.max_total_tokens)]
    if args.load_format:
        cmd += ["--load-format", args.load_format]
    if args.attention_backend:
        cmd += ["--attention-backend", args.attention_backend]
    if args.disable_piecewise_cuda_graph:
        cmd += ["--disable-piecewise-cuda-graph"]
    return cmd + shlex.split(kv_args) + shlex.split(args.server_args)


def bench_cmd(args, sc: Scenario, conc: int, n: int, port: int, out_file: str) -> List[str]:
    # random-ids needs no dataset download; bench_serving sets ignore_eos for the
    # sglang backend by default, so every request yields exactly OUT tokens.
    return _fmt_cmd(args.bench_cmd) + [
        "--backend", "sglang", "--host", args.host, "--port", str(port),
        "--model", args.model_path, "--dataset-name", "random-ids", "--random-range-ratio", "1",
        "--random-input-len", str(sc.input_len), "--random-output-len", str(sc.output_len),
        "--num-prompts", str(n), "--max-concurrency", str(conc), "--output-file", out_file,
    ] + warmup_args(args, sc, conc) + shlex.split(args.bench_args)


WARMUP_TOKENS = 8192  # one prefill chunk of prompts at most


def warmup_args(args, sc: Scenario, conc: int) -> List[str]:
    """bench_serving's own warm-up (short requests on one prompt, cache flushed after),
    as many requests as the concurrency while their prompts fit one 8192-token prefill
    (at least one: a long prompt's chunks already take the prefix path): the first point
    after a server start then does not carry one-time costs (on an H200 the INT4 servers'
    TTFT at their first point was 2x their second's). Left to --bench-args when it names
    --warmup-requests."""
    if not getattr(args, "warmup", True) or "--warmup-requests" in args.bench_args:
        return []
    return ["--warmup-requests", str(min(conc, max(1, WARMUP_TOKENS // sc.input_len)))]


def run_client(cmd: List[str], log_path: str, timeout_s: float) -> int:
    """Run the bench client in its own process group; kill the group on timeout/Ctrl-C."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(proc, 5.0)
            raise
        finally:
            if proc.poll() is None:
                kill_group(proc, 5.0)


def read_result(path: str) -> dict:
    """Last JSON line bench_serving appended to its --output-file."""
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    return json.loads(lines[-1])


def fill_point(pt: Point, res: dict) -> None:
    pt.completed = res.get("completed")
    pt.output_tok_s = res.get("output_throughput")
    pt.mean_ttft_ms = res.get("mean_ttft_ms")
    pt.p90_ttft_ms = res.get("p90_ttft_ms")
    pt.mean_itl_ms = res.get("mean_itl_ms")
    pt.p90_itl_ms = res.get("p90_itl_ms")
    pt.duration_s = res.get("duration")
    if pt.completed is not None and pt.completed < pt.num_prompts:
        pt.error = f"only {pt.completed}/{pt.num_prompts} requests completed"


def plan(args) -> List[tuple]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        try:
            mode_launch(m)
        except ValueError as e:
            raise SystemExit(f"--modes: {e}") from None
    scenarios = args.scenario or [Scenario.parse(s) for s in
                                  (BUDGET_SCENARIOS if args.budget else DEFAULT_SCENARIOS)]
    todo = [(m, sc, c) for m in modes for sc in scenarios for c in sc.concurrencies]
    wanted = {x.strip() for x in args.profile_points.split(",") if x.strip()}
    unknown = wanted - {f"{sc.name}:{c}" for _, sc, c in todo}
    if unknown:
        raise SystemExit(f"--profile-points {sorted(unknown)} name no planned point (SCENARIO:CONCURRENCY)")
    return todo


def profiled(args, sc: Scenario, c: int) -> bool:
    if not args.profile:
        return False
    wanted = {x.strip() for x in args.profile_points.split(",") if x.strip()}
    return not wanted or f"{sc.name}:{c}" in wanted


def run_sweep(args, progress=None) -> Sweep:
    os.makedirs(args.out, exist_ok=True)
    sweep = Sweep(args={k: (v if not isinstance(v, list) or not v or not isinstance(v[0], Scenario)
                            else [asdict(s) for s in v]) for k, v in vars(args).items()})
    todo = plan(args)
    modes = list(dict.fromkeys(m for m, _, _ in todo))
    for mode in modes:
        points = [(sc, c) for m, sc, c in todo if m == mode]
        port = args.port or reserve_port(args.host)
        # Profiles that name no output_dir land here too.
        env = dict(os.environ, SGLANG_TORCH_PROFILER_DIR=os.path.abspath(
            os.path.join(args.out, "profile"))) if args.profile else None
        srv = ManagedServer(server_cmd(args, mode, port), args.host, port,
                            os.path.join(args.out, f"server-{mode}.log"), env=env,
                            start_timeout_s=args.start_timeout)
        info = {"cmd": srv.cmd, "log": srv.log_path}
        sweep.servers[mode] = info
        try:
            srv.start()
            info["start_s"] = round(srv.wait_healthy(), 1)
            info["kv_tokens"] = kv_capacity(srv.server_info())
            for sc, c in points:
                pt = _run_point(args, srv, mode, sc, c, info.get("kv_tokens"))
                sweep.points.append(pt)
                if progress:
                    progress(pt)
                save(sweep, args.out)
        except (ServerStartError, RuntimeError, OSError) as e:
            # Record the failure for this mode's remaining points; go on with the next mode.
            info["error"] = str(e).splitlines()[0]
            why = info["error"]
            if isinstance(e, ServerStartError):
                why = f"server failed to start (log {srv.log_path})"
                print(f"\n{mode}: {e}", file=sys.stderr, flush=True)  # the log's path and tail
            for sc, c in points[len([p for p in sweep.points if p.mode == mode]):]:
                pt = Point(mode, sc.name, sc.input_len, sc.output_len, c,
                           sc.num_prompts(c, args.min_prompts), error=why)
                sweep.points.append(pt)
                if progress:
                    progress(pt)
        finally:
            srv.stop()
        save(sweep, args.out)
    return sweep


def _run_point(args, srv: ManagedServer, mode: str, sc: Scenario, c: int, kv) -> Point:
    n = sc.num_prompts(c, args.min_prompts)
    pt = Point(mode, sc.name, sc.input_len, sc.output_len, c, n, kv_tokens=kv)
    tag = f"{mode}-{sc.name}-c{c}"
    out_file = os.path.join(args.out, f"bench-{tag}.jsonl")
    if os.path.exists(out_file):
        os.remove(out_file)
    if not srv.alive():
        pt.error = "server died"
        return pt
    cap = None
    if profiled(args, sc, c):
        cap = ProfileCapture(srv.url, os.path.join(args.out, "profile", tag), args.profile_steps,
                             c, profile_id=tag, settle_s=args.profile_settle).start()
    try:
        rc = run_client(bench_cmd(args, sc, c, n, srv.port, out_file),
                        os.path.join(args.out, f"bench-{tag}.log"), args.point_timeout)
    except subprocess.TimeoutExpired:
        rc = None
        pt.error = f"bench client timed out after {args.point_timeout:.0f} s"
    except BaseException:
        if cap is not None:
            cap.cancel()
        raise
    if cap is not None:
        b = cap.finish() if srv.alive() else cap.cancel()
        pt.profile = {"running_reqs": cap.batch, "dir": cap.out_dir,
                      "error": cap.error or (None if b else "server died"),
                      "breakdown": b.to_dict() if b else None}
    if rc is None:
        return pt
    if rc != 0:
        pt.error = f"bench client exited {rc}" + ("" if srv.alive() else " (server died)")
        return pt
    try:
        fill_point(pt, read_result(out_file))
    except (OSError, ValueError) as e:
        pt.error = f"no result: {e}"
    return pt


# The profile breakdown is flattened into profile_* columns (per-step ms by category).
PROFILE_COLUMNS = ["profile_running_reqs", "profile_steps", "profile_kernel_ms", "profile_wall_ms"] + \
    [f"profile_{k}_ms" for k in prof.KEYS] + ["profile_attn_share", "profile_error"]
CSV_FIELDS = [f for f in Point.__dataclass_fields__ if f != "profile"] + PROFILE_COLUMNS


def csv_row(p: Point) -> dict:
    row = {k: v for k, v in asdict(p).items() if k != "profile"}
    if p.profile:
        b = p.profile.get("breakdown") or {}
        row.update(profile_running_reqs=p.profile.get("running_reqs"), profile_error=p.profile.get("error"),
                   profile_steps=b.get("steps"), profile_kernel_ms=b.get("kernel_ms"),
                   profile_wall_ms=b.get("wall_ms"), profile_attn_share=b.get("attn_share"),
                   **{f"profile_{k}_ms": (b.get("ms") or {}).get(k) for k in prof.KEYS})
    return row


def save(sweep: Sweep, out: str) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": sweep.args, "servers": sweep.servers,
                   "points": [asdict(p) for p in sweep.points]}, f, indent=1, default=str)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for p in sweep.points:
            w.writerow(csv_row(p))


def ratio(points: List[Point], pt: Point, num: str, den: str) -> Optional[float]:
    """num/den output tok/s at pt's (scenario, concurrency)."""
    by = {p.mode: p.output_tok_s for p in points
          if p.scenario == pt.scenario and p.concurrency == pt.concurrency}
    a, b = by.get(num), by.get(den)
    return a / b if a and b else None


def startup_line(servers: dict) -> str:
    """Seconds from launch to /health per mode (our kernels compile inside it, before the
    server says it is ready), beside the first mode's (BF16 in the usual sweep)."""
    timed = [(m, i["start_s"]) for m, i in servers.items() if "start_s" in i]
    first = timed[0][1]
    return "server start to ready: " + ", ".join(
        f"{m} {t:.1f} s" + ("" if n == 0 or not first else f" ({t / first:.2f}x)")
        for n, (m, t) in enumerate(timed))


def table(points: List[Point]) -> str:
    head = ["scenario", "conc", "mode", "KV tok", "done", "out tok/s", "TTFT ms (p90)",
            "ITL ms (p90)"] + [f"{n}/{d}" for n, d in RATIOS]
    rows = []
    for p in sorted(points, key=lambda p: (p.scenario, p.concurrency, _rank(p.mode))):
        r = [p.scenario, str(p.concurrency), p.mode, str(p.kv_tokens or "-"),
             f"{p.completed}/{p.num_prompts}" if p.completed is not None else f"-/{p.num_prompts}"]
        if p.output_tok_s is None:
            r += [f"ERROR: {p.error}", "", ""]
        else:
            r += [f"{p.output_tok_s:.0f}", f"{p.mean_ttft_ms:.0f} ({p.p90_ttft_ms:.0f})",
                  f"{p.mean_itl_ms:.2f} ({p.p90_itl_ms:.2f})"]
        for n, d in RATIOS:
            x = ratio(points, p, n, d) if p.mode == n else None
            r.append(f"{x:.2f}x" if x else "")
        rows.append(r)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plot(points: List[Point], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scen = list(dict.fromkeys(p.scenario for p in points if p.output_tok_s))
    if not scen:  # nothing measured: no empty plot
        return None
    fig, axes = plt.subplots(1, len(scen), figsize=(5.5 * len(scen), 4), squeeze=False)
    for ax, s in zip(axes[0], scen):
        for mode in sorted({p.mode for p in points}, key=_rank):
            pts = sorted((p.concurrency, p.output_tok_s) for p in points
                         if p.scenario == s and p.mode == mode and p.output_tok_s)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        first = next(p for p in points if p.scenario == s)
        ax.set(title=f"{s}: {first.input_len} in / {first.output_len} out",
               xlabel="concurrency", ylabel="output tok/s", xscale="log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def profile_rows(points: List[Point]) -> List[tuple]:
    """(mode, point label, Breakdown) of each profiled point that produced one."""
    rows = []
    for p in sorted(points, key=lambda p: (p.scenario, p.concurrency, _rank(p.mode))):
        if p.profile and p.profile.get("breakdown"):
            label = f"{p.scenario} c{p.concurrency}"
            if p.profile.get("running_reqs") not in (None, p.concurrency):
                label += f" ({p.profile['running_reqs']} running)"
            rows.append((p.mode, label, prof.Breakdown(**p.profile["breakdown"])))
    return rows


def report_profiles(points: List[Point], out: str, no_plot: bool, top: int = 8) -> Optional[str]:
    """Print the per-step breakdown table, each point's top kernels and failures; plot it."""
    rows = profile_rows(points)
    failed = [p for p in points if p.profile and p.profile.get("error")]
    if not rows and not failed:
        return None
    print("\nGPU time per decode step (ms), from SGLang's torch profiler:\n")
    print(prof.markdown_table(rows))
    for mode, label, b in rows:
        print(f"\n{mode} {label}: top kernels (ms per step, calls per step, category)")
        print(prof.top_kernels_text(b, top))
    for p in failed:
        print(f"profile {p.mode} {p.scenario} c={p.concurrency}: {p.profile['error']}")
    return None if no_plot or not rows else prof.plot(rows, os.path.join(out, "profile.png"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget:
        args.disable_piecewise_cuda_graph = True
    todo = plan(args)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="point", desc="bench serve")
    except ImportError:
        bar = None

    def progress(pt: Point) -> None:
        msg = f"{pt.mode} {pt.scenario} c={pt.concurrency}: " + (
            f"{pt.output_tok_s:.0f} tok/s" if pt.output_tok_s else f"ERROR {pt.error}")
        if bar:
            bar.update(1)
            bar.set_postfix_str(msg)
        else:
            print(msg, flush=True)

    t0 = time.monotonic()
    rc = 0
    sweep = None
    try:
        sweep = run_sweep(args, progress)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, partial results kept", file=sys.stderr)
        rc = 130
    finally:
        if bar:
            bar.close()
    if sweep is None:  # interrupted: reload what was saved so far
        try:
            with open(os.path.join(args.out, "results.json")) as f:
                points = [Point(**p) for p in json.load(f)["points"]]
        except (OSError, ValueError):
            points = []
    else:
        points = sweep.points
    print(table(points))
    if sweep is not None and any("start_s" in i for i in sweep.servers.values()):
        print(startup_line(sweep.servers))
    png = None if args.no_plot else plot(points, os.path.join(args.out, "throughput.png"))
    ppng = report_profiles(points, args.out, args.no_plot)
    print(f"\n{len(points)} points in {time.monotonic() - t0:.0f} s; results in {args.out}/"
          f" (results.json, results.csv{', throughput.png' if png else ''}"
          f"{', profile.png, profile/' if ppng else ''})")
    if rc == 0 and any(p.error for p in points):
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
