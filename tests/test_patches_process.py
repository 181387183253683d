"""Patches reach every process, apply once, and the user entry points pass args through."""

import multiprocessing as mp

import pytest

from saw_sglang.patches import apply_all


def _child(queue):
    # A spawned SGLang worker: plugins load through the entry point, nothing else.
    from sglang.srt.plugins import load_plugins
    from sglang.srt.mem_cache import kv_cache_dtype
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    import argparse

    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    choices = next(a for a in p._actions if a.dest == "kv_cache_dtype").choices
    _, dtype = kv_cache_dtype.configure_kv_cache_dtype(
        server_args_kv_cache_dtype="int4", model=None, model_dtype=None,
        is_draft_worker=False, is_dflash=False, speculative_draft_attention_backend=None,
    )
    from saw_sglang.patches import applied

    queue.put(("int4" in choices, str(dtype), applied()))


def test_spawned_child_gets_patches_through_entry_point():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q,))
    proc.start()
    try:
        has_int4, dtype, applied = q.get(timeout=240)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert has_int4 and dtype == "torch.uint8"
    assert "server_args" in applied and "kv_pool" in applied


def test_apply_all_is_idempotent_and_wraps_once():
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.server_args import ServerArgs

    first = apply_all()
    before = (ServerArgs.__dict__["__post_init__"], KVCacheConfigurator._build_mha_kv_pool)
    from saw_sglang.patches import PATCHES
    import importlib

    for name in PATCHES:  # applying a module again changes nothing
        assert importlib.import_module(f"saw_sglang.patches.{name}").apply() is False
    assert apply_all() == first
    assert (ServerArgs.__dict__["__post_init__"], KVCacheConfigurator._build_mha_kv_pool) == before


def test_configure_kv_cache_dtype_inert_for_other_dtypes():
    apply_all()
    import torch
    from sglang.srt.mem_cache import kv_cache_dtype

    kw = dict(model=None, model_dtype=torch.float16, is_draft_worker=False,
              is_dflash=False, speculative_draft_attention_backend=None)
    assert kv_cache_dtype.configure_kv_cache_dtype(server_args_kv_cache_dtype="int4", **kw) == (None, torch.uint8)
    assert kv_cache_dtype.configure_kv_cache_dtype(server_args_kv_cache_dtype="bf16", **kw) == (None, torch.bfloat16)
    assert kv_cache_dtype.configure_kv_cache_dtype(server_args_kv_cache_dtype="auto", **kw)[1] == torch.float16
    with pytest.raises(ValueError, match="Unsupported kv_cache_dtype"):
        kv_cache_dtype.configure_kv_cache_dtype(server_args_kv_cache_dtype="int3", **kw)


def test_launch_server_and_engine_arg_plumbing(tmp_path):
    from _saw_models import LLAMA, write

    model = write(tmp_path / "m", LLAMA)
    from saw_sglang.launch_server import prepare_server_args

    args = prepare_server_args([
        "--model-path", model, "--kv-cache-dtype", "int4", "--saw-rotation", "none",
        "--no-saw-rotate-v", "--device", "cpu", "--skip-tokenizer-init",
        "--attention-backend", "triton", "--mem-fraction-static", "0.5",  # SGLang flag
    ])
    assert (args.kv_cache_dtype, args.saw_rotation, args.saw_rotate_v) == ("int4", "none", False)
    assert args.mem_fraction_static == 0.5

    import saw_sglang
    from saw_sglang import engine

    assert saw_sglang.Engine is engine.Engine
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    assert engine.Engine is SGLangEngine
    eargs = engine.server_args(model_path=model, kv_cache_dtype="int4", saw_group_size=32,
                               attention_backend="triton", device="cpu", skip_tokenizer_init=True)
    assert eargs.saw_group_size == 32 and eargs.saw_rotation == "hadamard"
    with pytest.raises(TypeError):
        engine.server_args(model_path=model, saw_grup_size=32)


def test_launch_server_help_lists_our_flags():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "saw_sglang.launch_server", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--saw-rotation", "--saw-hadamard-block-size", "--saw-group-size",
                 "--saw-rotate-v", "int4", "--attention-backend"):
        assert flag in out.stdout
