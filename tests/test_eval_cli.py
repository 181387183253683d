"""python -m saw_sglang.eval end to end on a tiny local model folder (no network)."""

import json

import torch

from saw_sglang.eval.__main__ import main


def _tiny_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the of light rays and colours are refracted by a prism into".split()
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=256, initializer_range=0.15)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return words


def test_cli_end_to_end(tmp_path, capsys):
    words = _tiny_model_dir(tmp_path / "m")
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        text = " ".join(words[i] for i in torch.randint(0, len(words), (300,), generator=g).tolist())
        (tmp_path / f"{name}.txt").write_text(text)
    modes = "bf16,int4:rotation=none:scale-fit=minmax,fp8,int4,int4:hadamard-block-size=16,int4:group-size=16," \
            "int4:bf16-layers=1,int4:calibration=auto"
    rc = main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "a.txt"), "--text", str(tmp_path / "b.txt"),
               "--tokens", "120", "--ctx", "40", "--context", "200", "--modes", modes, "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {r["spec"]: r for r in res["results"]}
    assert list(rows) == modes.split(",")
    assert res["meta"]["head_dim"] == 32 and res["meta"]["scored_tokens"] == 240
    assert list(res["meta"]["windows"]) == ["a", "b"] and res["meta"]["context"] == 200
    assert rows["bf16"]["kl"] == 0 and rows["bf16"]["top1_agree"] == 1 and rows["bf16"]["dppl"] == 0
    assert rows["bf16"]["gap_closed_mean"] == 1 and rows["int4:rotation=none:scale-fit=minmax"]["gap_closed_mean"] == 0
    assert rows["int4:bf16-layers=1"]["keep_layers"] == [1] and rows["int4"]["block_size"] == 32
    assert rows["int4:calibration=auto"]["k_calibration"] and (tmp_path / "o" / "k-calibration.pt").exists()
    # 3 layers, 2 KV heads, D=32: BF16 768 B/token; bf16-layers=1 keeps layer 1 at BF16
    assert rows["bf16"]["bytes_per_token"] == 3 * 2 * 2 * 32 * 2
    assert rows["int4:bf16-layers=1"]["bytes_per_token"] == 2 * 2 * 2 * (16 + 4) + 256
    for r in rows.values():
        assert r["ppl"] > 1 and r["kl"] >= 0 and set(r["gap_closed"]) == {"a", "b"}
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("| int4:group-size=16 | 2.67x |") for line in out)
    # the last line is the one recommendation, with the exact server flags
    assert out[-1].startswith(f"Recommendation for {tmp_path / 'm'}: int4") and "Server flags: --kv-cache-dtype int4" in out[-1]
    assert res["meta"]["recommendation"] == out[-1]
    assert (tmp_path / "o" / "eval.png").stat().st_size > 1000


def test_cli_rejects_bad_modes_with_the_fix(tmp_path, capsys):
    import pytest

    _tiny_model_dir(tmp_path / "m")
    for argv, why in ((["--modes", "int4:v"], "now spelled 'rotate-v'"),
                      (["--texts", "poetry"], "choose from prose, code, docs, qa, dialogue")):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and why in capsys.readouterr().err


class _Tok:
    """Whitespace tokenizer: token id = word length; optionally adds a BOS (id 0)."""

    def __init__(self, bos):
        self.bos_token_id, self.bos = 0, bos

    def __call__(self, text, add_special_tokens=True):
        ids = [len(w) for w in text.split()]
        return type("Enc", (), {"input_ids": ([0] if self.bos and add_special_tokens else []) + ids})


def test_windows_cover_requested_tokens():
    from saw_sglang.eval.text import windows

    text = " ".join("x" * (1 + i % 9) for i in range(500))
    for bos in (False, True):
        for ctx, n in ((16, 100), (32, 31), (64, 1000)):
            ws = windows(_Tok(bos), text, ctx, n)
            assert sum(len(w) - 1 for w in ws) == min(n, 500 - (0 if bos else len(ws)))
            assert all(len(w) <= ctx and (w[0] == 0) == bos for w in ws)
            body = [t for w in ws for t in (w[1:] if bos else w)]
            assert body == [1 + i % 9 for i in range(len(body))]  # consecutive, nothing skipped


def test_calibrate_cli_writes_a_calibration_for_the_model(tmp_path):
    from saw_sglang.calibrate import main as calibrate_main
    from saw_sglang.kernels.calibration import KCalibration

    _tiny_model_dir(tmp_path / "m")
    out = tmp_path / "k.pt"
    assert calibrate_main(["--model", str(tmp_path / "m"), "--out", str(out), "--tokens", "120",
                           "--ctx", "40", "--context", "256"]) == 0
    cal = KCalibration.load(out)
    assert cal.shape == (3, 2, 32) and "offsets over [0, 256)" in cal.source
    gm = cal.scale.log().mean(-1).exp()  # geometric mean 1 per layer and head
    torch.testing.assert_close(gm, torch.ones_like(gm))
