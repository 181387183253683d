"""python -m saw_sglang.calibrate: make a model's K calibration file for the INT4 cache.

Runs the model once (transformers, BF16) over the bundled calibration text at
positions spread over its context and writes, per layer, KV head and channel, the
mean of K (and with --with-scale the scale that balances K against the queries;
kernels/calibration.py, saw_sglang/eval/calibrate.py). The accuracy tool measures what it buys
(`python -m saw_sglang.eval --modes bf16,int4,int4:calibration=FILE`); the server
takes it as --saw-calibration FILE once its attention kernels read calibrated keys.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm


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
