"""`python -m saw_sglang.deploy.entrypoint ARGS`: the container's entry point.

Runs `python -m saw_sglang.launch_server` with the image's defaults followed by ARGS
(the arguments after the image name in `docker run`, or a pod's `args`). A default is
dropped when ARGS (or the YAML file of `--config`) sets the same option, so each
argument adds to the defaults or overrides one of them:

    docker run IMAGE --model-path Qwen/Qwen3-8B
      -> --host 0.0.0.0 --port 30000 --kv-cache-dtype int4 --model-path Qwen/Qwen3-8B
    docker run IMAGE --model-path Qwen/Qwen3-8B --kv-cache-dtype bf16 --port=8000
      -> --host 0.0.0.0 --model-path Qwen/Qwen3-8B --kv-cache-dtype bf16 --port=8000

ARGS whose first word is not an option run as a command instead (`docker run IMAGE
bash`). Before handing over, the address the server will answer on is written to
$SAW_STATE_DIR/server.json for `python -m saw_sglang.deploy.ready`.
"""

from __future__ import annotations

import json
import os
import sys

LAUNCHER = ("-m", "saw_sglang.launch_server")
DEFAULTS = (("--host", "0.0.0.0"), ("--port", "30000"), ("--kv-cache-dtype", "int4"))
STATE_DIR_ENV = "SAW_STATE_DIR"
DEFAULT_STATE_DIR = "/tmp/saw-sglang"
USAGE = ("saw-sglang: no arguments: pass the model to serve, e.g. "
         "`docker run --gpus 1 IMAGE --model-path Qwen/Qwen3-8B` (any SGLang flag may follow)")


def _option(token: str) -> str | None:
    """`--name` for `--name` and `--name=value`; None for values and short flags."""
    if not token.startswith("--") or token == "--":
        return None
    return token.split("=", 1)[0]


def config_options(args: list[str]) -> dict[str, object]:
    """The options of SGLang's `--config FILE` (a YAML mapping), as {"--name": value}.

    SGLang puts them before the command line (command line > config > defaults), so
    an image default on the command line would override the file: they count as given.
    An unreadable file is left for SGLang to report."""
    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return {}
    try:
        import yaml
    except ImportError:
        return {}
    try:
        with open(args[args.index("--config") + 1]) as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {f"--{k}": v for k, v in data.items()}  # as SGLang's merger spells them


def given_options(args: list[str]) -> set[str]:
    """Every option name that ARGS set, on the command line or in its --config file."""
    return {o for o in map(_option, args) if o} | set(config_options(args))


def server_args(args: list[str]) -> list[str]:
    """The launcher's arguments: the defaults ARGS does not set, then ARGS unchanged
    (SGLang's parser keeps the last value of an option, so ARGS also win when they
    spell an option in a way this does not recognise, e.g. an abbreviation)."""
    given = given_options(args)
    kept = [tok for name, value in DEFAULTS if name not in given for tok in (name, value)]
    return kept + list(args)


def option_value(args: list[str], name: str) -> str | None:
    """The value the server will use for option `name`: the last one on the command
    line (`--name v` or `--name=v`), else the --config file's, else None."""
    value = None
    for i, tok in enumerate(args):
        if tok == name and i + 1 < len(args):
            value = args[i + 1]
        elif tok.startswith(name + "="):
            value = tok[len(name) + 1:]
    if value is None:
        config = config_options(args)
        value = str(config[name]) if name in config else None
    return value


def server_url(args: list[str]) -> str:
    """Where a process in the same container reaches the server's HTTP port."""
    host = option_value(args, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if option_value(args, "--ssl-certfile") else "http"
    return f"{scheme}://{host}:{option_value(args, '--port') or '30000'}"


def write_state(args: list[str], state_dir: str) -> None:
    """server.json (the URL and API key; owner-only, like the key on the command line)
    for the readiness check, and no warm-up marker: this start has not warmed up."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    state = {"url": server_url(args), "api_key": option_value(args, "--api-key")}
    path = os.path.join(state_dir, "server.json")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)
    try:
        os.remove(os.path.join(state_dir, "warm"))
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        sys.exit(USAGE)
    if not args[0].startswith("-"):
        try:
            os.execvp(args[0], args)
        except OSError as e:
            sys.exit(f"saw-sglang: cannot run {args[0]!r}: {e.strerror}")
    full = server_args(args)
    try:
        write_state(full, os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))
    except OSError as e:  # the server still starts; the readiness check falls back to its defaults
        print(f"saw-sglang: state for the readiness check not written: {e}", file=sys.stderr)
    os.execv(sys.executable, [sys.executable, *LAUNCHER, *full])


if __name__ == "__main__":
    main()
