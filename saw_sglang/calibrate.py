"""python -m saw_sglang.calibrate: make a model's K calibration file for the INT4 cache.

Runs the model once (transformers, BF16) over the bundled calibration text at
positions spread over its context and writes, per layer, KV head and channel, the
mean of K (and with --with-scale the scale that balances K against the queries;
kernels/calibration.py, saw_sglang/eval/calibrate.py). The accuracy tool measures what it buys
(`python -m saw_sglang.eval --modes bf16,int4,int4:calibration=FILE`); the server
takes it as --saw-calibration FILE. `--saw-calibration auto` runs this tool once per
model at server start (`auto_calibration`) and reuses the file after that.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

AUTO = "auto"
CACHE_ENV = "SAW_SGLANG_CACHE_DIR"


def auto_path(model_path: str, context: int | None = None) -> Path:
    """Where `--saw-calibration auto` keeps a model's file: $SAW_SGLANG_CACHE_DIR (default
    ~/.cache/saw_sglang)/k-calibration/NAME-HASH.pt, the hash over the model's path (or hub
    name), its config.json and the context the windows are spread over."""
    local = os.path.exists(model_path)
    ident = os.path.abspath(model_path) if local else str(model_path)
    h = hashlib.sha256(f"{ident}\0{context}".encode())
    cfg = Path(ident, "config.json")
    if local and cfg.is_file():
        h.update(cfg.read_bytes())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_path).rstrip("/")).name)[:64] or "model"
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "saw_sglang")
    return root / "k-calibration" / f"{name}-{h.hexdigest()[:16]}.pt"


def auto_calibration(model_path: str, context: int | None = None, device: str | None = None,
                     run=subprocess.run) -> str:
    """The K calibration file of a model for `--saw-calibration auto`: the cached one, or
    one made now by this tool in a child process (which frees its memory on exit: the
    model is loaded with transformers, on one GPU if there is one). Raises ValueError
    naming the manual route if that fails."""
    path = auto_path(model_path, context)
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = [sys.executable, "-m", "saw_sglang.calibrate", "--model", str(model_path), "--out", str(tmp),
           "--device", device] + (["--context", str(context)] if context else [])
    print(f"--saw-calibration auto: calibrating K of {model_path} on {device}, once (kept in {path})",
          file=sys.stderr)
    rc = run(cmd).returncode
    if rc != 0 or not tmp.is_file():
        raise ValueError(f"--saw-calibration auto: calibrating {model_path} failed (exit {rc}; its output is "
                         f"above). Make the file with python -m saw_sglang.calibrate --model {model_path} "
                         "--out FILE [--device cpu] and pass --saw-calibration FILE, or drop the flag.")
    os.replace(tmp, path)
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m saw_sglang.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF causal LM folder / hub name, a .gguf file, or a preset (smollm2-135m, gemma3-270m)")
    p.add_argument("--out", required=True, help="the calibration file to write (.pt)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--context", type=int, default=None,
                   help="spread the windows over positions [0, CONTEXT) (default: the model's max "
                        "positions, at most 32768): use the longest context you serve")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--with-scale", action="store_true",
                   help="also write the per-channel scales (K divided, q multiplied; the reader must "
                        "fold them into q). Default: the shift alone, which measured as well "
                        "(docs/eval.md) and needs no query fold")
    args = p.parse_args(argv)

    from saw_sglang.eval import models
    from saw_sglang.eval.calibrate import calibrate
    from saw_sglang.eval.hook import register

    print(f"loading {args.model} ...", file=sys.stderr)
    tok = models.load_tokenizer(args.model)
    model = models.load_model(args.model, args.device, torch.bfloat16, register())
    nl, kvh, _ = models.kv_shape(model.config)
    hq = model.config.get_text_config().num_attention_heads
    with tqdm(desc="calibrating K", unit="window") as bar:
        cal = calibrate(model, tok, nl, hq, kvh, tokens=args.tokens, ctx=args.ctx, context=args.context,
                        device=args.device, progress=bar)
    if not args.with_scale:
        cal = cal.without_scale()
    cal.save(args.out)
    print(f"wrote {args.out}: K calibration [layers, kv heads, head_dim] = {list(cal.shape)} ({cal.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
