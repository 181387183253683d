"""ServerArgs: accept `--kv-cache-dtype int4` and the --saw-* flags, pick our
defaults, and refuse unsupported combinations before any model weight loads.

- CLI: argparse `choices` are rebuilt from annotations on every `add_cli_args`
  call, so "int4" is added to the parser action each time, not to the field.
- Our options are plain attributes on ServerArgs (`saw_*`), accepted as keyword
  arguments by `ServerArgs(...)` and so by `Engine(...)`; pickling carries them to
  the spawned scheduler.
- Defaults for int4: attention backend `flashinfer` (our INT4 variant) when none
  is given; piecewise prefill CUDA graph off unless the prefill graph backend is
  chosen explicitly; no post-capture KV resizing (quantized pools cannot).
- Refusals run in the parent process, before the scheduler starts: the checks that
  need no model (backends, explicit --saw-* values against a local config.json)
  before SGLang's own `__post_init__` (which probes the accelerator), the rest
  (model families, features) at its end.
"""

from __future__ import annotations

import contextvars
import logging
import os

from sglang.srt.server_args import ServerArgs

from saw_sglang.calibrate import AUTO, auto_calibration
from saw_sglang.config import (
    DEFAULT_BACKEND,
    KV_CACHE_DTYPE,
    SawConfig,
    add_cli_args,
    check_backends,
    check_flags,
    from_namespace,
    refusal,
    served_format,
)

from ._util import is_int4, wrap

logger = logging.getLogger(__name__)
_pending_cli = contextvars.ContextVar("saw_pending_cli", default=None)


def _extend_kv_dtype_choices(parser) -> None:
    for action in parser._actions:
        if action.dest == "kv_cache_dtype" and action.choices is not None:
            if KV_CACHE_DTYPE not in action.choices:
                action.choices = [*action.choices, KV_CACHE_DTYPE]
                action.help = (action.help or "") + (
                    ' "int4" selects the SAW-INT4 cache (token-wise INT4 with '
                    "block-Hadamard rotation, saw-sglang; see --saw-* options)."
                )


def _add_cli_args(orig):
    def add_cli_args_(parser):
        orig(parser)
        _extend_kv_dtype_choices(parser)
        add_cli_args(parser)

    return add_cli_args_


def _from_cli_args(orig):
    def from_cli_args_(cls, args):
        token = _pending_cli.set(from_namespace(args))
        try:
            return orig(cls, args)
        finally:
            _pending_cli.reset(token)

    return from_cli_args_


def _init(orig):
    def __init__(self, *args, **kwargs):
        values = dict(_pending_cli.get() or {})
        values.update({n: kwargs.pop(n) for n in SawConfig.names() if n in kwargs})
        for name, value in vars(SawConfig.from_object(values)).items():
            object.__setattr__(self, name, value)
        orig(self, *args, **kwargs)

    return __init__


def _post_init(orig):
    def __post_init__(self):
        if is_int4(self):
            # Before SGLang's own post-init, which probes the accelerator; validate()
            # repeats the feature checks on what the post-init resolves.
            check_flags(SawConfig.from_object(self), self.model_path, _backends(self))
            check_features(self)
            _default_prefill_graph_off(self)
        orig(self)
        if is_int4(self):
            validate(self)

    return __post_init__


def _default_prefill_graph_off(args) -> None:
    """Piecewise prefill capture goes through the extend path of the attention
    backend; ours is not captured, so turn it off unless the user chose a prefill
    graph backend (then that choice stands)."""
    from sglang.srt.model_executor.cuda_graph_config import Backend

    explicit = args.cuda_graph_backend_prefill is not None or bool(args.cuda_graph_config)
    if not explicit and not args.disable_cuda_graph:
        args.cuda_graph_backend_prefill = Backend.DISABLED
        logger.info(
            "kv-cache-dtype int4: piecewise prefill CUDA graph disabled (decode CUDA "
            "graphs stay on); set --cuda-graph-backend-prefill to override."
        )


def _default_attn_backend(orig):
    def _get_default_attn_backend(self, *args, **kwargs):
        if is_int4(self):
            logger.info(
                "kv-cache-dtype int4: attention backend not given, using %s (INT4).",
                DEFAULT_BACKEND,
            )
            return DEFAULT_BACKEND
        return orig(self, *args, **kwargs)

    return _get_default_attn_backend


def _post_capture(orig):
    def post_capture_kv_sizing_planned(self, *args, **kwargs):
        return False if is_int4(self) else orig(self, *args, **kwargs)

    return post_capture_kv_sizing_planned


# -- refusals -------------------------------------------------------------------------
def _fail(what: str, fix: str):
    raise refusal(what, fix)


def _backends(args) -> dict:
    return {
        "prefill": args.prefill_attention_backend or args.attention_backend,
        "decode": args.decode_attention_backend or args.attention_backend,
    }


def check_model(model_config) -> None:
    """Refuse model families whose KV pool is not the plain MHA pool."""
    from sglang.srt.configs.hybrid_arch import (
        hybrid_gdn_config,
        kimi_linear_config,
        linear_attn_model_spec,
        mambaish_config,
    )
    from sglang.srt.configs.model_config import (
        AttentionArch,
        is_deepseek_dsa,
        is_deepseek_v4,
        is_hybrid_swa_model,
        is_minimax_sparse,
    )

    hf = model_config.hf_config
    arch = (getattr(hf, "architectures", None) or ["?"])[0]
    fix = "Serve this model with --kv-cache-dtype auto (or fp8_e4m3)."
    if is_deepseek_dsa(hf) or is_deepseek_v4(hf):
        _fail(f"DeepSeek sparse attention (DSA) models ({arch})", fix)
    if model_config.attention_arch == AttentionArch.MLA:
        _fail(f"MLA models ({arch}): INT4 covers multi-head / grouped-query attention", fix)
    if getattr(model_config, "is_hybrid_swa", False):
        _fail(f"hybrid sliding-window models ({arch})", fix)
    text = getattr(model_config, "hf_text_config", hf)
    # Sliding-window layers on the plain pool (e.g. Gemma 2/3, or a hybrid model run with
    # --disable-hybrid-swa-memory) would only fail at the first forward: refuse them here.
    if ("sliding_attention" in (getattr(text, "layer_types", None) or ())
            or is_hybrid_swa_model(getattr(hf, "architectures", None) or [], text)):
        _fail(f"sliding-window attention layers ({arch})", fix)
    if mambaish_config(model_config) is not None or hybrid_gdn_config(model_config) is not None:
        _fail(f"Mamba / hybrid linear-attention models ({arch})", fix)
    if kimi_linear_config(model_config) is not None or linear_attn_model_spec(model_config):
        _fail(f"hybrid linear-attention models ({arch})", fix)
    if is_minimax_sparse(hf):
        _fail(f"MiniMax sparse-attention models ({arch})", fix)
    if model_config.head_dim != model_config.v_head_dim:
        _fail(
            f"models whose K and V head dims differ ({model_config.head_dim} vs "
            f"{model_config.v_head_dim}, {arch})", fix,
        )


def check_features(args) -> None:
    """Refuse attention backends and features that read or move KV without scales."""
    check_backends(_backends(args))
    if args.enable_hierarchical_cache or args.hicache_storage_backend:
        _fail(
            "the hierarchical cache (its host pool has no room for INT4 scales)",
            "Drop --enable-hierarchical-cache / --hicache-storage-backend.",
        )
    if getattr(args, "enable_hisparse", False) or getattr(args, "enable_lmcache", False):
        _fail("HiSparse / LMCache offloading", "Drop --enable-hisparse / --enable-lmcache.")
    if args.disaggregation_mode not in (None, "null"):
        _fail(
            "prefill/decode disaggregation (the KV transfer does not carry scales)",
            "Drop --disaggregation-mode, or use --kv-cache-dtype fp8_e4m3.",
        )
    if (args.dcp_size or 1) > 1:
        _fail("decode context parallelism (--dcp-size > 1)", "Use --dcp-size 1.")
    if args.speculative_algorithm is not None:
        _fail(
            f"speculative decoding ({args.speculative_algorithm}): its draft KV "
            "path is not INT4-aware yet",
            "Drop --speculative-algorithm, or use --kv-cache-dtype auto.",
        )
    if getattr(args, "enable_page_major_kv_layout", False):
        _fail("the page-major KV layout", "Drop --enable-page-major-kv-layout.")
    if os.environ.get("SGLANG_USE_HND_KVCACHE", "").lower() in ("1", "true", "yes"):
        _fail("the HND KV layout", "Unset SGLANG_USE_HND_KVCACHE.")
    if os.environ.get("SGLANG_NATIVE_MOVE_KV_CACHE", "").lower() in ("1", "true", "yes"):
        # the native move reads 4-D buffers as [pages, page, heads, dim]: it would
        # copy one head of the [rows, heads, groups, 2] scale buffers
        _fail("SGLANG_NATIVE_MOVE_KV_CACHE", "Unset it (the default slot copy moves scales).")


def validate(args) -> None:
    """All int4 refusals for a resolved ServerArgs (raises ValueError)."""
    if str(args.model_path).lower() not in ("none", "dummy"):
        model_config = args.get_model_config()
        check_model(model_config)
        served_format(args, model_config.head_dim)
        if args.saw_calibration == AUTO:  # made (or found) here, before any worker starts
            args.override("--saw-calibration auto",
                          saw_calibration=auto_calibration(args.model_path, args.context_length))
        if args.saw_calibration:
            check_calibration(args.saw_calibration, model_config)
    check_features(args)


def check_calibration(path, model_config) -> None:
    """--saw-calibration: a readable calibration file of this model's shape."""
    from saw_sglang.kernels.calibration import KCalibration

    cal = KCalibration.load(path)
    want = (model_config.num_hidden_layers, model_config.get_total_num_kv_heads(), model_config.head_dim)
    if cal.shape != want:
        raise ValueError(f"--saw-calibration {path} is for [layers, kv heads, head_dim] {cal.shape}, "
                         f"this model has {want}: make one with python -m saw_sglang.calibrate.")


def apply() -> bool:
    patched = [
        wrap(ServerArgs, "add_cli_args", _add_cli_args, kind="staticmethod"),
        wrap(ServerArgs, "from_cli_args", _from_cli_args, kind="classmethod"),
        wrap(ServerArgs, "__init__", _init),
        wrap(ServerArgs, "__post_init__", _post_init),
        wrap(ServerArgs, "_get_default_attn_backend", _default_attn_backend),
        wrap(ServerArgs, "post_capture_kv_sizing_planned", _post_capture),
    ]
    return any(patched)
