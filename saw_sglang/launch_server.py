"""`python -m saw_sglang.launch_server`: SGLang's server with the INT4 KV cache.

Every SGLang flag passes through unchanged; `--kv-cache-dtype int4` and the
`--saw-*` options are added. The patches are applied here explicitly and, through
the plugin entry point, in every worker SGLang spawns.

Bad input ends in one line on stderr and exit code 2: our flags are checked before
SGLang is even imported, SGLang's own argument errors and refusals before any model
or accelerator is touched.
"""

from __future__ import annotations

import os
import sys

from saw_sglang.cli import Parser, fail, one_line_errors

PROG = "python -m saw_sglang.launch_server"


def precheck(argv: list[str]) -> None:
    """The int4 flags that need neither SGLang nor the model (raises ValueError or
    exits with argparse's one-line error)."""
    from saw_sglang.config import KV_CACHE_DTYPE, SawConfig, add_cli_args, check_flags, from_namespace

    if "-h" in argv or "--help" in argv:
        return
    p = Parser(prog=PROG, add_help=False, allow_abbrev=False)
    p.add_argument("--kv-cache-dtype")
    p.add_argument("--model-path", "--model")
    for phase in ("", "prefill-", "decode-"):
        p.add_argument(f"--{phase}attention-backend")
    add_cli_args(p)
    ns, _ = p.parse_known_args(argv)
    if ns.kv_cache_dtype == KV_CACHE_DTYPE:
        check_flags(SawConfig(**from_namespace(ns)), ns.model_path,
                    {"prefill": ns.prefill_attention_backend or ns.attention_backend,
                     "decode": ns.decode_attention_backend or ns.attention_backend})


def prepare_server_args(argv: list[str]):
    """ServerArgs from a command line (SGLang's parser + ours, patches applied)."""
    from saw_sglang.patches import apply_all

    apply_all()
    from sglang.srt.server_args import prepare_server_args as sglang_prepare

    with one_line_errors(PROG):
        return sglang_prepare(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from saw_sglang.version_guard import UnsupportedSGLangVersion

    try:
        precheck(argv)
        from saw_sglang.patches import apply_all

        apply_all()
        from sglang.srt.plugins import load_plugins

        load_plugins()
        server_args = prepare_server_args(argv)
    except (ValueError, UnsupportedSGLangVersion) as e:
        fail(PROG, e)

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
