"""The accuracy tool's KV modes are exactly the project's reference round trips, and
its attention hook leaves BF16 untouched and sees the rotation's benefit."""

import pytest
import torch

from saw_sglang.eval.hook import kv_mode, register
from saw_sglang.eval.modes import build, default_specs
from saw_sglang.kv_modes import parse
from saw_sglang.eval.score import simulate
from saw_sglang.kernels import reference as ref
from saw_sglang.kernels.calibration import KCalibration
from saw_sglang.kernels.format import Int4KVFormat


def parse_mode(spec, d, keep_layers=()):
    return build(spec, d)


@pytest.mark.parametrize("shape", [(2, 3, 5, 64), (1, 1, 7, 128), (4, 9, 32)])
@pytest.mark.parametrize("spec", ["int4", "int4:rotation=none", "int4:hadamard-block-size=16",
                                  "int4:hadamard-block-size=32:rotate-v", "int4:group-size=32",
                                  "int4:rotation=none:group-size=32", "int4:scale-fit=lsq",
                                  "int4:hadamard-block-size=16:group-size=16:rotate-v"])
def test_int4_roundtrip_is_reference(shape, spec):
    d = shape[-1]
    m = parse_mode(spec, d)
    x = torch.randn(shape, dtype=torch.bfloat16) * 3
    x[..., 5] *= 40  # an outlier channel
    for is_key in (True, False):
        rotated = m.fmt.k_rotated if is_key else m.fmt.v_rotated
        want = ref.dequantize_values(*ref.quantize(x, m.fmt, rotated), m.fmt, rotated).to(x.dtype)
        got = m.roundtrip(x, layer=3, is_key=is_key)
        assert got.dtype == x.dtype and torch.equal(got, want)
    assert m.fmt.k_rotated == ("rotation=none" not in spec)
    assert m.fmt.v_rotated == (":rotate-v" in spec)
    assert m.fmt.scale_fit == ("lsq" if "lsq" in spec else "minmax")


def test_fp8_bf16_and_kept_layers():
    x = torch.randn(3, 2, 6, 64, dtype=torch.bfloat16) * 50
    assert torch.equal(parse_mode("bf16", 64).roundtrip(x, 0, True), x)
    for name in ("fp8", "fp8_e4m3"):  # SGLang's dtype name is accepted, spelled fp8
        fp8 = parse_mode(name, 64)
        assert fp8.name == "fp8" and torch.equal(fp8.roundtrip(x, 0, True), x.to(torch.float8_e4m3fn).to(x.dtype))
    keep = parse_mode("int4:bf16-layers=0+2", 64)
    assert keep.keep_layers == (0, 2) and parse("int4:bf16-layers=1-3").sim_options["bf16-layers"] == (1, 2, 3)
    assert torch.equal(keep.roundtrip(x, 2, True), x)
    assert not torch.equal(keep.roundtrip(x, 1, True), x)
    sink = parse_mode("int4:sink-tokens=2", 64)
    y = sink.roundtrip(x, 0, True)
    assert torch.equal(y[..., :2, :], x[..., :2, :]) and not torch.equal(y[..., 2:, :], x[..., 2:, :])
    # fp32 activations are first cast to the BF16 an engine writes
    xf = torch.randn(2, 64)
    assert torch.equal(parse_mode("bf16", 64).roundtrip(xf, 0, True), xf.bfloat16().float())


@pytest.mark.parametrize("d,kvh,layers", [(64, 3, 30), (256, 1, 18), (128, 8, 36)])
def test_bytes_per_token_from_format(d, kvh, layers):
    bf16 = 2 * layers * kvh * d * 2
    assert parse_mode("bf16", d).bytes_per_token(kvh, layers, d) == bf16
    assert parse_mode("fp8", d).bytes_per_token(kvh, layers, d) == bf16 // 2
    for g in (d, 32):
        m = parse_mode(f"int4:group-size={g}", d)
        assert m.bytes_per_token(kvh, layers, d) == Int4KVFormat(d, group_size=g).bytes_per_token(kvh, layers)
    kept = parse_mode("int4:bf16-layers=0+1", d).bytes_per_token(kvh, layers, d)
    assert kept == Int4KVFormat(d).bytes_per_token(kvh, layers - 2) + 2 * (bf16 // layers)


def test_the_unknown_option_error_lists_every_option_and_each_listed_one_parses():
    from dataclasses import fields

    from saw_sglang.config import SawConfig
    from saw_sglang.kv_modes import OPTIONS, SIM_OPTIONS

    with pytest.raises(ValueError) as e:
        parse("int4:bogus=1")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("int4 takes " + OPTIONS)
    names = {f.name[len("saw_"):].replace("_", "-") for f in fields(SawConfig)} | set(SIM_OPTIONS)
    listed = [item.strip() for part in OPTIONS.split("; simulation only:") for item in part.split(", ")]
    assert {item.split("=")[0].split(" |")[0] for item in listed} == names
    for item in listed:
        key, _, values = item.partition("=")
        for alt in (values.split("|") if values else key.split(" | ")):
            opt = f"{key}={alt}" if values else alt
            opt = opt.replace("=N", "=32").replace("=FILE", "=k.pt")
            extra = ":calibration=k.pt" if key == "calibration-parts" else ""
            parse(f"int4:{opt}{extra}")


def test_specs_parse_and_reject():
    for d in (64, 128, 256):
        for s in default_specs(d):
            build(s, d, lambda src: KCalibration.identity(2, 2, d))
    for bad, why in (("int8", "unknown KV mode"), ("int4:hadamard-block-size=3", "power of two"),
                     ("int4:group-size=48", "even divisor"), ("int4:zz=1", "unknown or malformed"),
                     ("fp8:group-size=16", "only int4 takes options"), ("int4:rotate-v=1", "is a switch"),
                     ("int4:group-size=x", "positive integer"), ("int4:b=16", "now spelled 'hadamard-block-size'"),
                     ("int4:keep=0.1", "now spelled 'bf16-layers'"), ("saw-int4", "now spelled 'int4'"),
                     ("int4:bf16-layers=0.1", "ranges a-b"), ("int4:scale-fit=mse", "scale fit must be one of"),
                     ("int4:calibration-parts=mean", "needs calibration")):
        with pytest.raises(ValueError, match=why):
            parse_mode(bad, 64)


def _tiny_llama(seed, heavy_k=0.0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=128, initializer_range=0.15,
                      attn_implementation=register())
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if heavy_k:
        with torch.no_grad():
            for layer in model.model.layers:
                w = layer.self_attn.k_proj.weight.view(2, 32, 64)  # [kv head, channel, hidden]
                w[:, 3] *= heavy_k  # channel 3 and its RoPE partner 19 carry the outlier
                w[:, 19] *= heavy_k
    return model


def test_bf16_mode_reproduces_unquantized_logits():
    model = _tiny_llama(0)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad(), kv_mode(parse_mode("bf16", 32)):
        ours = model(ids).logits
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        stock = model(ids).logits
    assert torch.equal(ours, stock)
    # and a quantized mode does change them (the hook is live)
    model.config._attn_implementation = register()
    with torch.no_grad(), kv_mode(parse_mode("int4:rotation=none", 32)):
        assert not torch.equal(model(ids).logits, stock)


@pytest.mark.parametrize("seed", [1, 5])
def test_rotation_lowers_kl_with_planted_outlier(seed):
    # initializer_range 0.15: attention that matters (default-size weights barely attend)
    model = _tiny_llama(seed, heavy_k=25.0)
    gen = torch.Generator().manual_seed(seed + 1)
    wins = [torch.randint(0, 97, (48,), generator=gen).tolist() for _ in range(3)]
    modes = [parse_mode(s, 32) for s in ("bf16", "int4:rotation=none", "int4")]
    t = {k: v.metrics() for k, v in simulate(model, wins, modes, "cpu").items()}
    assert t["bf16"]["kl"] == 0 and t["bf16"]["top1_agree"] == 1
    assert t["int4:rotation=none"]["kl"] > 0
    assert t["int4"]["kl"] < 0.7 * t["int4:rotation=none"]["kl"], t


def test_gemma3_sliding_window_bf16_exact_and_hooked():
    """Gemma 3 (sliding-window and global layers, 1 KV head): the hook keeps the
    stock masks, so BF16 reproduces SDPA exactly."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                           initializer_range=0.15, attn_implementation=register())
    model = Gemma3ForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad(), kv_mode(parse_mode("bf16", 32)):
        ours = model(ids).logits
    with torch.no_grad(), kv_mode(parse_mode("int4", 32)):
        quant = model(ids).logits
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        stock = model(ids).logits
    assert torch.equal(ours, stock) and not torch.equal(quant, stock)


@pytest.mark.parametrize("spec", ["int4:rotation=none:q8", "int4:q8", "int4:hadamard-block-size=16:q8"])
def test_q8_rounds_queries_on_the_kernel_basis(spec):
    """int4:q8 rounds each query row to int8 (absmax / 127) in the basis the decode
    kernel multiplies in (rotated when K is); kept layers and plain modes leave q alone."""
    from saw_sglang.kernels import reference as ref

    m = parse_mode(spec + ":bf16-layers=2", 64)
    assert m.q_int8 and not parse_mode("int4", 64).q_int8
    q = torch.randn(3, 4, 7, 64, generator=torch.Generator().manual_seed(5))
    got = m.query(q, layer=0)
    rot = m.fmt.k_rotated
    basis = (lambda x: ref.rotate(x, m.fmt.block_size)) if rot else (lambda x: x.float())
    x, y = basis(q), basis(got)
    step = x.abs().amax(-1, keepdim=True) / 127
    codes = y / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the int8 grid
    assert ((y - x).abs() <= step / 2 + 1e-5).all()  # round to nearest
    assert not torch.equal(got, q)
    assert torch.equal(m.query(q, layer=2), q)  # kept layer
    assert torch.equal(parse_mode("int4", 64).query(q, 0), q)
    with pytest.raises(ValueError):
        parse_mode("bf16:q8", 64)
    assert not parse("int4:q8").servable


def test_k_calibration_roundtrip_is_the_affine_reference():
    """int4:calibration=FILE: K written as (k - mean) / scale, read back and undone;
    V untouched; calibration-parts picks one half."""
    gen = torch.Generator().manual_seed(4)
    cal = KCalibration(torch.randn(2, 3, 64, generator=gen), torch.rand(2, 3, 64, generator=gen) + 0.5)
    m = build("int4:calibration=x.pt", 64, lambda src: cal)
    k = torch.randn(1, 3, 5, 64, generator=gen).bfloat16()
    mul, add = cal.write_affine(1)
    packed, scales = ref.quantize(k, m.fmt, True, affine=(mul[:, None], add[:, None]))
    want = ref.dequantize_values(packed, scales, m.fmt, True) * cal.scale[1][:, None] + cal.mean[1][:, None]
    assert torch.equal(m.roundtrip(k, 1, is_key=True), want.to(k.dtype))
    assert torch.equal(m.roundtrip(k, 1, is_key=False), build("int4:scale-fit=lsq", 64).roundtrip(k, 1, is_key=False))
    half = build("int4:calibration=x.pt:calibration-parts=scale", 64, lambda src: cal)
    assert half.calibration.mean.abs().max() == 0 and torch.equal(half.calibration.scale, cal.scale)
    auto = build("int4:calibration=auto", 64, lambda src: cal)  # in-tool: the shift alone
    assert torch.equal(auto.calibration.mean, cal.mean) and auto.calibration.scale.eq(1).all()
    both = build("int4:calibration=auto:calibration-parts=mean+scale", 64, lambda src: cal)
    assert torch.equal(both.calibration.scale, cal.scale)
    assert parse("int4:calibration=x.pt").server_args()[-2:] == ["--saw-calibration", "x.pt"]
    assert parse("int4:calibration=auto").server_args()[-2:] == ["--saw-calibration", "auto"]
    with pytest.raises(ValueError, match="simulation-only.*sink-tokens"):
        parse("int4:sink-tokens=4").server_args()


def test_scale_fit_defaults_to_least_squares_with_a_calibration():
    cal = KCalibration.identity(2, 2, 64)
    assert build("int4", 64).fmt.scale_fit == "minmax"
    assert build("int4:calibration=auto", 64, lambda src: cal).fmt.scale_fit == "lsq"
    assert build("int4:calibration=auto:scale-fit=minmax", 64, lambda src: cal).fmt.scale_fit == "minmax"
