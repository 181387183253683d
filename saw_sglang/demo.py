"""`make demo`: the main job on its defaults (replaced by the accuracy tool's default run)."""

import torch

from saw_sglang.kernels.format import Int4KVFormat
from saw_sglang.kernels import reference as ref

SHAPES = {"SmolLM2-135M": (64, 3, 30), "Qwen3-8B": (128, 8, 36)}  # head_dim, kv heads, layers


def main() -> None:
    for name, (d, h, layers) in SHAPES.items():
        fmt = Int4KVFormat(head_dim=d)
        per_tok = fmt.bytes_per_token(h, layers)
        bf16 = 2 * layers * h * d * 2
        k = torch.randn(512, h, d)
        k[..., 3] *= 30
        errs = []
        for rotated in (False, True):
            y = ref.dequantize_values(*ref.quantize(k, fmt, rotated), fmt, rotated)
            errs.append(float((y - k).norm() / k.norm()))
        print(f"{name}: {fmt.describe()}")
        print(f"  KV bytes/token {per_tok} vs BF16 {bf16} ({bf16 / per_tok:.2f}x); "
              f"K rel. error with an outlier channel: naive {errs[0]:.4f}, rotated {errs[1]:.4f}")


if __name__ == "__main__":
    main()
