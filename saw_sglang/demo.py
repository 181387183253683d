"""`make demo`: the accuracy tool on its defaults (SmolLM2-135M, bundled text, CPU)."""

import sys

from saw_sglang.eval.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
