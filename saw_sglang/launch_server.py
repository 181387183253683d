"""`python -m saw_sglang.launch_server`: SGLang's server with the INT4 KV cache.

Every SGLang flag passes through unchanged; `--kv-cache-dtype int4` and the
`--saw-*` options are added. The patches are applied here explicitly and, through
the plugin entry point, in every worker SGLang spawns.
"""

from __future__ import annotations

import os
import sys


def prepare_server_args(argv: list[str]):
    """ServerArgs from a command line (SGLang's parser + ours, patches applied)."""
    from saw_sglang.patches import apply_all

    apply_all()
    from sglang.srt.server_args import prepare_server_args as sglang_prepare

    return sglang_prepare(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from saw_sglang.patches import apply_all

    apply_all()
    from sglang.srt.plugins import load_plugins

    load_plugins()
    server_args = prepare_server_args(argv)

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
