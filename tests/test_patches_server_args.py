"""--kv-cache-dtype int4 and the --saw-* flags on the real SGLang 0.5.17 ServerArgs:
parsing, defaults, and every refusal (before any model weight loads)."""

import argparse
import pickle

import pytest

from saw_sglang.patches import apply_all

apply_all()

from sglang.srt.server_args import ServerArgs  # noqa: E402

from saw_sglang.patches import server_args as sa_patch  # noqa: E402
from _saw_models import LLAMA, MLA, write  # noqa: E402

CPU = dict(device="cpu", skip_tokenizer_init=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write(tmp_path_factory.mktemp("llama"), LLAMA)


def parser():
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def test_parser_accepts_int4_and_saw_flags(llama):
    ns = parser().parse_args([
        "--model-path", llama, "--kv-cache-dtype", "int4", "--saw-rotation", "none",
        "--saw-hadamard-block-size", "32", "--saw-group-size", "32", "--saw-rotate-v",
        "--saw-scale-fit", "lsq",
        "--device", "cpu", "--skip-tokenizer-init", "--attention-backend", "triton",
    ])
    args = ServerArgs.from_cli_args(ns)
    assert args.kv_cache_dtype == "int4"
    assert (args.saw_rotation, args.saw_hadamard_block_size, args.saw_group_size,
            args.saw_rotate_v, args.saw_scale_fit) == ("none", 32, 32, True, "lsq")
    # the options survive the pickle that carries ServerArgs to the scheduler
    again = pickle.loads(pickle.dumps(args))
    assert (again.saw_group_size, again.saw_rotate_v) == (32, True)


def test_choices_rebuilt_per_parser_still_include_int4():
    for _ in range(2):
        action = next(a for a in parser()._actions if a.dest == "kv_cache_dtype")
        assert "int4" in action.choices and "fp8_e4m3" in action.choices


@pytest.mark.parametrize("argv", [
    ["--kv-cache-dtype", "int3"],
    ["--saw-rotation", "random"],
    ["--saw-hadamard-block-size", "48"],
    ["--saw-hadamard-block-size", "0"],
    ["--saw-group-size", "-8"],
    ["--saw-scale-fit", "mse"],
])
def test_parser_rejects_bad_values(argv):
    with pytest.raises(SystemExit):
        parser().parse_args(["--model-path", "x", *argv])


def test_saw_defaults_and_int4_defaults(llama):
    args = ServerArgs(model_path=llama, kv_cache_dtype="int4", attention_backend="triton", **CPU)
    assert (args.saw_rotation, args.saw_hadamard_block_size, args.saw_group_size,
            args.saw_rotate_v, args.saw_scale_fit, args.saw_calibration) == ("hadamard", None, None, False, None, None)
    assert args.cuda_graph_config.prefill.backend == "disabled"
    assert args.post_capture_kv_sizing_planned() is False
    # no backend given -> ours (Hopper's default would be fa3)
    assert args._get_default_attn_backend(False, args.get_model_config()) == "flashinfer"


def test_explicit_prefill_graph_backend_is_kept(llama):
    args = ServerArgs(model_path=llama, kv_cache_dtype="int4", attention_backend="triton",
                      cuda_graph_backend_prefill="tc_piecewise", **CPU)
    assert args.cuda_graph_config.prefill.backend == "tc_piecewise"


def test_inert_for_other_dtypes(llama):
    args = ServerArgs(model_path=llama, kv_cache_dtype="fp8_e4m3", attention_backend="fa3", **CPU)
    assert args.attention_backend == "fa3"
    assert args.cuda_graph_config.prefill.backend != "disabled"
    # fa3 is refused only for int4:
    ServerArgs(model_path=llama, kv_cache_dtype="auto", attention_backend="fa3", **CPU)


REFUSALS = [
    (dict(attention_backend="fa3"), "fa3 attention backend.*--attention-backend flashinfer"),
    (dict(attention_backend="torch_native"), "torch_native attention backend \\(prefill\\)"),
    (dict(attention_backend="triton", decode_attention_backend="torch_native"), "torch_native.*decode"),
    (dict(attention_backend="triton", enable_hierarchical_cache=True), "hierarchical cache.*--enable-hierarchical-cache"),
    (dict(attention_backend="triton", speculative_algorithm="EAGLE"), "speculative decoding.*Drop --speculative-algorithm"),
    (dict(attention_backend="triton", saw_hadamard_block_size=48), "power of two dividing head_dim 64"),
    (dict(attention_backend="triton", saw_hadamard_block_size=128), "power of two dividing head_dim 64"),
    (dict(attention_backend="triton", saw_group_size=24), "group size 24 must be an even divisor"),
    (dict(attention_backend="triton", saw_group_size=4), "--saw-group-size 4: .*groups of at least 32"),
    (dict(attention_backend="triton", saw_rotation="random"), "rotation must be one of"),
    (dict(attention_backend="triton", saw_group_size=16), "groups of at least 32.*leave it unset"),
    (dict(attention_backend="triton", saw_scale_fit="mse"), "--saw-scale-fit .mse.: must be one of minmax, lsq"),
    (dict(attention_backend="triton", saw_calibration="no-such-k.pt"), "no such file; make one with python -m saw_sglang.calibrate"),
]


@pytest.mark.parametrize("kwargs,message", REFUSALS)
def test_refusals_name_the_fix(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(model_path=llama, kv_cache_dtype="int4", **CPU, **kwargs)


def test_groups_of_32_accepted_smaller_refused(llama):
    args = ServerArgs(model_path=llama, kv_cache_dtype="int4", saw_group_size=32, **CPU,
                      attention_backend="triton")
    assert args.saw_group_size == 32
    with pytest.raises(ValueError, match="at least 32"):
        ServerArgs(model_path=llama, kv_cache_dtype="int4", saw_group_size=16, **CPU,
                   attention_backend="triton")


def test_head_dims_the_kernels_do_not_read_are_refused(tmp_path):
    """kernels/format.py's SERVED_HEAD_DIMS, asked at startup rather than at the first write."""
    model = write(tmp_path / "m96", {**LLAMA, "head_dim": 96})
    with pytest.raises(ValueError, match="does not support head_dim 96 .*--kv-cache-dtype auto"):
        ServerArgs(model_path=model, kv_cache_dtype="int4", attention_backend="triton", **CPU)
    ServerArgs(model_path=model, kv_cache_dtype="auto", attention_backend="triton", **CPU)


def test_feature_refusals_on_resolved_args(llama):
    """PD disaggregation and DCP need a GPU setup to resolve; check the validator
    on a resolved args object with those fields set."""
    args = ServerArgs(model_path=llama, kv_cache_dtype="int4", attention_backend="triton", **CPU)
    for field, value, message in [
        ("disaggregation_mode", "prefill", "disaggregation.*Drop --disaggregation-mode"),
        ("dcp_size", 2, "decode context parallelism.*--dcp-size 1"),
        ("enable_page_major_kv_layout", True, "page-major"),
    ]:
        args.override("test", **{field: value})
        with pytest.raises(ValueError, match=message):
            sa_patch.check_features(args)
        args.override("test", **{field: {"disaggregation_mode": "null", "dcp_size": 1,
                                         "enable_page_major_kv_layout": False}[field]})
    sa_patch.check_features(args)


@pytest.mark.parametrize("kwargs,message", [
    (dict(speculative_algorithm="EAGLE"), "speculative decoding"),
    (dict(enable_hierarchical_cache=True), "hierarchical cache"),
    (dict(disaggregation_mode="prefill"), "disaggregation"),
    (dict(dcp_size=2), "decode context parallelism"),
])
def test_feature_refusals_come_before_the_accelerator_probe(llama, monkeypatch, kwargs, message):
    """No device given: SGLang's post-init would probe the accelerator (on a CPU machine, a
    "No accelerator" RuntimeError in place of the refusal)."""
    import sglang.srt.server_args as sglang_sa

    def probe():
        raise AssertionError("the accelerator was probed before the refusal")

    monkeypatch.setattr(sglang_sa, "get_device", probe)
    with pytest.raises(ValueError, match=message):
        ServerArgs(model_path=llama, kv_cache_dtype="int4", attention_backend="triton",
                   skip_tokenizer_init=True, **kwargs)


def test_hnd_layout_refused(llama, monkeypatch):
    args = ServerArgs(model_path=llama, kv_cache_dtype="int4", attention_backend="triton", **CPU)
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    with pytest.raises(ValueError, match="SGLANG_USE_HND_KVCACHE"):
        sa_patch.check_features(args)


def test_mla_model_refused_before_load(tmp_path):
    with pytest.raises(ValueError, match="MLA models.*--kv-cache-dtype auto"):
        ServerArgs(model_path=write(tmp_path, MLA), kv_cache_dtype="int4",
                   attention_backend="triton", **CPU)


def test_sliding_window_layers_refused(llama):
    """Gemma-2/3-style sliding-window layers on the plain pool are refused at startup,
    not at the first forward."""
    mc = ServerArgs(model_path=llama, kv_cache_dtype="auto", **CPU).get_model_config()
    mc.hf_text_config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding-window attention layers"):
        sa_patch.check_model(mc)
    mc.hf_text_config.layer_types = ["full_attention", "full_attention"]
    sa_patch.check_model(mc)


@pytest.mark.parametrize("flag,value,message", [
    ("is_hybrid_swa", True, "hybrid sliding-window"),
    ("v_head_dim", 32, "K and V head dims differ"),
])
def test_model_family_refusals(llama, flag, value, message):
    mc = ServerArgs(model_path=llama, kv_cache_dtype="auto", **CPU).get_model_config()
    sa_patch.check_model(mc)  # a plain GQA model passes
    setattr(mc, flag, value)
    with pytest.raises(ValueError, match=message):
        sa_patch.check_model(mc)
