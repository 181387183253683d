"""User-facing options of the INT4 KV cache: one definition for the CLI flags,
the `ServerArgs` attributes and the `Engine` keyword arguments.

Every option is `--saw-...` on the command line and `saw_...` in Python. They only
matter with `--kv-cache-dtype int4`. No SGLang import here: the patches read this
module, not the other way round.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields

from saw_sglang.kernels.format import ROTATIONS, SCALE_FITS, Int4KVFormat, group_examples
from saw_sglang.kernels.format import MIN_SERVED_GROUP, SERVED_HEAD_DIMS

KV_CACHE_DTYPE = "int4"
SUPPORTED_BACKENDS = ("flashinfer", "triton")  # the attention backends with INT4 kernels
DEFAULT_BACKEND = "flashinfer"


@dataclass(frozen=True)
class SawConfig:
    """The INT4 KV options as given by the user (None = derived from head_dim)."""

    saw_rotation: str = "hadamard"
    saw_hadamard_block_size: int | None = None
    saw_group_size: int | None = None
    saw_rotate_v: bool = False
    saw_scale_fit: str | None = None  # None: lsq with a calibration, minmax without
    saw_calibration: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_object(cls, obj) -> "SawConfig":
        """Read the options off a ServerArgs (or any object / dict); missing = default."""
        get = obj.get if isinstance(obj, dict) else (lambda k, d: getattr(obj, k, d))
        default = cls()
        return cls(**{n: get(n, getattr(default, n)) for n in cls.names()})

    @property
    def scale_fit(self) -> str:
        """Least squares pays off on calibrated keys (docs/eval.md), min-max otherwise."""
        return self.saw_scale_fit or ("lsq" if self.saw_calibration else "minmax")

    def fmt(self, head_dim: int) -> Int4KVFormat:
        """The KV format for a model with this head_dim; raises ValueError naming the flag."""
        try:
            fmt = Int4KVFormat(
                head_dim=head_dim,
                group_size=self.saw_group_size,
                rotation=self.saw_rotation,
                block_size=self.saw_hadamard_block_size,
                rotate_v=self.saw_rotate_v,
                scale_fit=self.scale_fit,
            )
        except ValueError as e:
            raise ValueError(
                f"--kv-cache-dtype int4: {e}. Fix --saw-group-size / "
                f"--saw-hadamard-block-size / --saw-rotation / --saw-scale-fit (or leave them unset for "
                f"the defaults: group {head_dim}, block {min(128, head_dim)})."
            ) from None
        return fmt


def is_int4(obj) -> bool:
    """Whether a run uses the INT4 KV cache: "int4" itself, or an object (ServerArgs, model
    runner, pool configurator) whose own kv_cache_dtype(_str) is "int4", else whose
    server_args' is. The one test every patch asks."""
    if isinstance(obj, str):
        return obj == KV_CACHE_DTYPE
    for attr in ("kv_cache_dtype_str", "kv_cache_dtype"):
        value = getattr(obj, attr, None)
        if isinstance(value, str):
            return value == KV_CACHE_DTYPE
    server_args = getattr(obj, "server_args", None)
    return server_args is not None and is_int4(server_args)


def refusal(what: str, fix: str) -> ValueError:
    return ValueError(f"--kv-cache-dtype int4 does not support {what}. {fix}")


def check_backends(backends: dict) -> None:
    """Refuse attention backends without INT4 kernels ({phase: name or None})."""
    for phase, name in backends.items():
        if name is not None and name not in SUPPORTED_BACKENDS:
            raise refusal(
                f"the {name} attention backend ({phase})",
                f"Use --attention-backend {DEFAULT_BACKEND} (or triton); both have INT4 kernels.",
            )


def served_format(options, head_dim: int) -> Int4KVFormat:
    """The INT4 format a server runs: the --saw-* options (a SawConfig, or a ServerArgs or
    anything else carrying saw_* attributes) for the model's head_dim; the one place a
    run's format is built. Raises ValueError naming the model or the flag to change when
    the INT4 attention kernels do not read it (kernels/format.py: SERVED_HEAD_DIMS,
    MIN_SERVED_GROUP)."""
    if head_dim not in SERVED_HEAD_DIMS:
        raise refusal(f"head_dim {head_dim} (the INT4 kernels read head_dim "
                      f"{', '.join(map(str, SERVED_HEAD_DIMS))})",
                      "Serve this model with --kv-cache-dtype auto (or fp8_e4m3).")
    cfg = options if isinstance(options, SawConfig) else SawConfig.from_object(options)
    fmt = cfg.fmt(head_dim)
    if fmt.group_size < MIN_SERVED_GROUP:
        ok = group_examples(head_dim, (head_dim, head_dim // 2, MIN_SERVED_GROUP))
        raise ValueError(
            f"--saw-group-size {fmt.group_size}: the INT4 attention kernels need groups of "
            f"at least {MIN_SERVED_GROUP} channels. Use {ok}, or leave it unset (one group per head).")
    return fmt


def local_head_dim(model_path) -> int | None:
    """head_dim from a local model folder's config.json (no SGLang, no weights), or None."""
    try:
        with open(os.path.join(str(model_path), "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    head_dim = text.get("head_dim")
    if not head_dim and text.get("hidden_size") and text.get("num_attention_heads"):
        head_dim = text["hidden_size"] // text["num_attention_heads"]
    return int(head_dim) if isinstance(head_dim, int) and head_dim > 0 else None


def check_flags(cfg: SawConfig, model_path=None, backends: dict | None = None) -> None:
    """The int4 checks that need neither SGLang nor the model's weights, run before
    either loads: attention backends, and the --saw-* values given explicitly, against
    the head_dim of a local config.json when there is one (otherwise what holds for
    every head_dim; SGLang's model config completes the check later). Raises
    ValueError naming the flag to fix."""
    check_backends(backends or {})
    if cfg.saw_rotation not in ROTATIONS:
        raise ValueError(f"--saw-rotation {cfg.saw_rotation!r}: rotation must be one of {', '.join(ROTATIONS)}.")
    if cfg.saw_scale_fit is not None and cfg.saw_scale_fit not in SCALE_FITS:
        raise ValueError(f"--saw-scale-fit {cfg.saw_scale_fit!r}: must be one of {', '.join(SCALE_FITS)}, "
                         "or leave it unset.")
    if cfg.saw_calibration not in (None, "auto") and not os.path.isfile(str(cfg.saw_calibration)):
        raise ValueError(f"--saw-calibration {cfg.saw_calibration}: no such file; make one with "
                         "python -m saw_sglang.calibrate --model MODEL --out FILE.")
    g, b = cfg.saw_group_size, cfg.saw_hadamard_block_size
    for flag, v in (("--saw-group-size", g), ("--saw-hadamard-block-size", b)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{flag} {v!r}: expected a positive integer, or leave it unset.")
    head_dim = local_head_dim(model_path) if (g, b) != (None, None) else None
    if head_dim is not None:
        served_format(cfg, head_dim)
        return
    if b is not None and b & (b - 1):
        raise ValueError(f"--saw-hadamard-block-size {b}: use a power of two dividing head_dim "
                         "(e.g. 64 or 128), or leave it unset for min(128, head_dim).")
    if g is not None and g % 2:
        raise ValueError(f"--saw-group-size {g}: a group is an even number of channels dividing "
                         f"head_dim, at least {MIN_SERVED_GROUP} (e.g. 64 or 32 for head_dim 64); "
                         "leave it unset for one group per head.")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _power_of_two(text: str) -> int:
    value = _positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two, got {value}")
    return value


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the --saw-* flags (idempotent per parser)."""
    if any(a.dest == "saw_rotation" for a in parser._actions):
        return
    d = SawConfig()
    g = parser.add_argument_group(
        "saw-sglang INT4 KV cache", "Options of --kv-cache-dtype int4 (ignored otherwise)."
    )
    g.add_argument(
        "--saw-rotation", choices=ROTATIONS, default=d.saw_rotation,
        help="Rotation applied before quantizing: block-diagonal Hadamard (default) "
        "or none (naive INT4).",
    )
    g.add_argument(
        "--saw-hadamard-block-size", type=_power_of_two, default=d.saw_hadamard_block_size,
        help="Hadamard block size, a power of two dividing head_dim "
        "(default: min(128, head_dim)).",
    )
    g.add_argument(
        "--saw-group-size", type=_positive_int, default=d.saw_group_size,
        help="Channels sharing one scale/min pair (default: head_dim, one group per "
        f"token-head). Smaller groups: an even divisor of head_dim, at least {MIN_SERVED_GROUP}.",
    )
    g.add_argument(
        "--saw-rotate-v", action=argparse.BooleanOptionalAction, default=d.saw_rotate_v,
        help="Also rotate V (default: off; K is always rotated when rotation is on).",
    )
    g.add_argument(
        "--saw-scale-fit", choices=SCALE_FITS, default=d.saw_scale_fit,
        help="How the write picks each group's fp16 (scale, min): minmax maps min and max to "
        "codes 0 and 15; lsq keeps those codes and least-squares fits the pair to the values "
        "(lower squared error, more write work). Same stored format and readers. Default: "
        "lsq with --saw-calibration, minmax without.",
    )
    g.add_argument(
        "--saw-calibration", default=d.saw_calibration, metavar="FILE|auto",
        help="A per-model K calibration (per-channel shift and scale before the rotation, "
        "exact in attention) made by `python -m saw_sglang.calibrate`; `auto` makes it at "
        "startup, once per model (transformers loads the model on one GPU for ~a minute), "
        "and reuses it from ~/.cache/saw_sglang (or $SAW_SGLANG_CACHE_DIR). Default: none.",
    )


def from_namespace(ns: argparse.Namespace) -> dict:
    """The saw_* values found on an argparse namespace."""
    return {n: getattr(ns, n) for n in SawConfig.names() if hasattr(ns, n)}
