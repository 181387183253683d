"""`--saw-calibration auto`: the K calibration made once per model at startup
(saw_sglang.calibrate.auto_calibration) and reused. One test runs the real tool in a
child process on a tiny random Llama built here (transformers on CPU, ~20 s)."""

import json

import pytest
import torch

from saw_sglang import calibrate as cb
from saw_sglang.kernels.calibration import KCalibration

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "num_hidden_layers": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cb.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_model(root):
    """A random 2-layer Llama (head_dim 64) with a byte-level BPE tokenizer trained here."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(root)
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k not in ("architectures", "model_type")},
                                   vocab_size=len(fast), bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root)
    return str(root)


def test_auto_path_depends_on_model_config_and_context(tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, layers in ((a, 2), (b, 3)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": layers}))
    pa = cb.auto_path(str(a))
    assert pa == cb.auto_path(str(a)) and pa.parent == cache / "k-calibration" and pa.name.startswith("a-")
    assert pa != cb.auto_path(str(a), context=4096)
    (b / "config.json").write_text(json.dumps({**TINY, "num_hidden_layers": 2}))
    assert cb.auto_path(str(b)) != pa  # another folder
    assert cb.auto_path("org/Model-7B").name.startswith("Model-7B-")  # a hub name


def test_auto_calibration_runs_the_tool_once_and_reuses_its_file(tmp_path, cache):
    calls = []

    def run(cmd):
        calls.append(cmd)
        KCalibration.identity(2, 1, 64).save(cmd[cmd.index("--out") + 1])
        return type("R", (), {"returncode": 0})()

    path = cb.auto_calibration("org/m", context=8192, device="cpu", run=run)
    assert KCalibration.load(path).shape == (2, 1, 64)
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "saw_sglang.calibrate"] and cmd[cmd.index("--model") + 1] == "org/m"
    assert cmd[cmd.index("--device") + 1] == "cpu" and cmd[cmd.index("--context") + 1] == "8192"
    assert cb.auto_calibration("org/m", context=8192, run=run) == path and len(calls) == 1
    assert [p.name for p in (cache / "k-calibration").iterdir()] == [path.rsplit("/", 1)[1]]


def test_auto_calibration_failure_names_the_manual_route(cache):
    with pytest.raises(ValueError, match="calibrating org/m failed.*python -m saw_sglang.calibrate --model org/m"):
        cb.auto_calibration("org/m", device="cpu", run=lambda cmd: type("R", (), {"returncode": 1})())
    assert not cb.auto_path("org/m").exists()


def test_server_args_auto_makes_the_file_with_the_real_tool(tmp_path, cache):
    """ServerArgs(..., saw_calibration="auto") on a local model: the tool runs in a child
    process, the resolved ServerArgs carries the file, a second start reuses it."""
    from saw_sglang.patches import apply_all

    apply_all()
    from sglang.srt.server_args import ServerArgs

    model = tiny_model(tmp_path / "tiny")
    kw = dict(model_path=model, kv_cache_dtype="int4", attention_backend="triton", device="cpu",
              skip_tokenizer_init=True, saw_calibration="auto")
    args = ServerArgs(**kw)
    assert args.saw_calibration == str(cb.auto_path(model))
    cal = KCalibration.load(args.saw_calibration)
    assert cal.shape == (2, 1, 64) and cal.mean.abs().sum() > 0 and cal.scale.eq(1).all()
    stamp = cb.auto_path(model).stat().st_mtime_ns
    assert ServerArgs(**kw).saw_calibration == args.saw_calibration
    assert cb.auto_path(model).stat().st_mtime_ns == stamp
