"""Bad input is refused before anything heavy, as one line on stderr (no traceback) and
exit code 2: the server launcher (before SGLang is even imported), the Engine (before
SGLang probes the accelerator or spawns a process) and the accuracy tool (before the
model's weights load)."""

import json
import multiprocessing
import subprocess
import sys
import textwrap

import pytest

from test_eval_cli import _tiny_model_dir

# Runs a module as `python -m` would, then reports whether SGLang got imported.
RUN = textwrap.dedent("""
    import runpy, sys
    mod, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    try:
        runpy.run_module(mod, run_name="__main__", alter_sys=True)
    finally:
        print("sglang imported:", "sglang" in sys.modules)
""")


def run(module, *args):
    out = subprocess.run([sys.executable, "-c", RUN, module, *map(str, args)],
                         capture_output=True, text=True, timeout=600)
    return out.returncode, out.stderr.strip().splitlines(), out.stdout


def one_line(rc, err, *fragments):
    assert rc == 2, err
    assert len(err) == 1, "\n".join(err)
    assert "Traceback" not in err[0] and err[0].split(": error: ")[0].startswith("python -m saw_sglang.")
    for f in fragments:
        assert f in err[0]
    return err[0]


@pytest.fixture(scope="module")
def head_dim_64(tmp_path_factory):
    """A model folder with only a config.json (head_dim 576 / 9 = 64), no weights."""
    d = tmp_path_factory.mktemp("smollm2-config")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}))
    return str(d)


LAUNCH = "saw_sglang.launch_server"


@pytest.mark.parametrize("flags,fragments", [
    (["--saw-group-size", "7"], ["--saw-group-size 7", "even number of channels"]),
    (["--attention-backend", "fa3"], ["fa3 attention backend", "--attention-backend flashinfer"]),
    (["--saw-rotation", "foo"], ["--saw-rotation", "'foo'", "hadamard", "(see --help)"]),
    (["--saw-hadamard-block-size", "48"], ["power of two", "(see --help)"]),
    (["--saw-calibration", "k.pt"], ["--saw-calibration k.pt", "no such file", "saw_sglang.calibrate"]),
    (["--saw-scale-fit", "mse"], ["--saw-scale-fit", "'mse'", "lsq"]),
])
def test_launch_server_refuses_before_sglang_loads(flags, fragments):
    rc, err, out = run(LAUNCH, "--model-path", "x", "--kv-cache-dtype", "int4", *flags)
    one_line(rc, err, *fragments)
    assert "sglang imported: False" in out


def test_launch_server_checks_groups_against_a_local_config(head_dim_64):
    rc, err, out = run(LAUNCH, "--model-path", head_dim_64, "--kv-cache-dtype", "int4",
                       "--saw-group-size", "7")
    line = one_line(rc, err, "group size 7", "head_dim 64", "(e.g. 64 or 32)", "--saw-group-size")
    assert "32 or 32" not in line and "sglang imported: False" in out
    rc, err, _ = run(LAUNCH, "--model-path", head_dim_64, "--kv-cache-dtype", "int4",
                     "--saw-group-size", "16")
    one_line(rc, err, "at least 32 channels", "Use 64 or 32")


def test_sglang_argument_errors_are_one_line_too():
    out = subprocess.run([sys.executable, "-m", LAUNCH, "--model-path", "x", "--kv-cache-dtype",
                          "int4", "--no-such-flag"], capture_output=True, text=True, timeout=600)
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 2 and len(errors) == 1 and "--no-such-flag" in errors[0]
    assert "usage:" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags,fragment", [
    (["--speculative-algorithm", "EAGLE"], "Drop --speculative-algorithm"),
    (["--enable-hierarchical-cache"], "Drop --enable-hierarchical-cache"),
])
def test_unsupported_features_are_refused_before_the_accelerator(flags, fragment):
    out = subprocess.run([sys.executable, "-m", LAUNCH, "--model-path", "x", "--kv-cache-dtype",
                          "int4", *flags], capture_output=True, text=True, timeout=600)
    # SGLang's import may warn about the platform on a CPU machine; the error is one line
    errors = [ln for ln in out.stderr.splitlines() if "error:" in ln.lower()]
    assert out.returncode == 2 and len(errors) == 1 and fragment in errors[0], out.stderr[-2000:]
    assert errors[0].startswith("python -m saw_sglang.launch_server: error: ")
    assert "Traceback" not in out.stderr and "accelerator" not in out.stderr


def test_engine_refuses_before_probing_or_spawning(head_dim_64):
    from saw_sglang.engine import Engine

    # Without a local config the group is still odd for every head_dim; on this CPU
    # machine a later check would end in SGLang's "No accelerator" RuntimeError instead.
    with pytest.raises(ValueError, match="--saw-group-size 7"):
        Engine(model_path="x", kv_cache_dtype="int4", saw_group_size=7)
    with pytest.raises(ValueError, match=r"group size 7 .*head_dim 64 \(e\.g\. 64 or 32\)") as e:
        Engine(model_path=head_dim_64, kv_cache_dtype="int4", saw_group_size=7)
    assert "32 or 32" not in str(e.value)
    with pytest.raises(ValueError, match="fa3 attention backend"):
        Engine(model_path=head_dim_64, kv_cache_dtype="int4", attention_backend="fa3")
    assert multiprocessing.active_children() == []


EVAL = "saw_sglang.eval"


@pytest.mark.parametrize("args,fragments", [
    (["--tokens", "0"], ["--tokens 0: must be at least 1"]),
    (["--ctx", "0"], ["--ctx 0: must be at least 2"]),
    (["--text", "/nonexistent/text.txt"], ["--text /nonexistent/text.txt: no such file"]),
    (["--modes", "bf16,int4:bogus=1"], ["unknown or malformed option 'bogus=1'", "int4 takes rotation=",
                                        "group-size=N", "calibration=FILE|auto", "sink-tokens=N"]),
    (["--modes", "int4:g=32"], ["option 'g' is now spelled 'group-size'"]),
    (["--modes", "int5"], ["unknown KV mode 'int5'", "bf16, fp8 or int4"]),
    (["--text", "/nonexistent/text.txt", "--text", "/nonexistent/other.txt"], ["no such file"]),
])
def test_eval_checks_its_inputs_before_the_model(args, fragments, tmp_path):
    # A model that does not exist: any attempt to load it would be a different error.
    rc, err, _ = run(EVAL, "--model", "/nonexistent/model", "--out", tmp_path / "o", *args)
    one_line(rc, err, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def model_without_weights(tmp_path_factory):
    """The tiny eval model's config and tokenizer, its weights deleted: loading them fails."""
    d = tmp_path_factory.mktemp("tiny")
    _tiny_model_dir(d / "m")
    for f in (d / "m").glob("*.safetensors"):
        f.unlink()
    (d / "t.txt").write_text("the light of a prism " * 20)  # 100 words
    return d


def test_eval_says_when_the_text_is_shorter_than_tokens(model_without_weights):
    d = model_without_weights
    rc, err, _ = run(EVAL, "--model", d / "m", "--text", d / "t.txt", "--tokens", "5000",
                     "--ctx", "40", "--out", d / "o")
    line = one_line(rc, err, "--tokens 5000", "gives only", "at --ctx 40")
    scored = int(line.split("gives only ")[1].split()[0])
    assert 90 <= scored < 100  # 100 words, a few lost to window starts
    assert f"--tokens {scored} or fewer" in line


def test_eval_checks_modes_against_the_model_config_before_the_weights(model_without_weights):
    d = model_without_weights  # head_dim 32
    rc, err, _ = run(EVAL, "--model", d / "m", "--text", d / "t.txt", "--tokens", "20",
                     "--modes", "int4:group-size=7", "--out", d / "o")
    one_line(rc, err, "group size 7", "head_dim 32", "(e.g. 32 or 16)")
