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
    text = " ".join(words[i] for i in torch.randint(0, len(words), (300,), generator=g).tolist())
    (tmp_path / "t.txt").write_text(text)
    rc = main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--tokens", "120",
               "--ctx", "40", "--modes", "bf16,fp8_e4m3,int4:rot=none,int4,int4:b=16,int4:g=16",
               "--bf16-layers", "1", "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {r["spec"]: r for r in res["results"]}
    assert list(rows) == ["bf16", "fp8_e4m3", "int4:rot=none", "int4", "int4:b=16", "int4:g=16"]
    assert res["meta"]["head_dim"] == 32 and res["meta"]["scored_tokens"] == 120
    assert rows["bf16"]["kl"] == 0 and rows["bf16"]["top1_agree"] == 1 and rows["bf16"]["dppl"] == 0
    assert rows["int4"]["keep_layers"] == [1] and rows["int4"]["block_size"] == 32
    # 3 layers, 2 KV heads, D=32: BF16 768 B/token; int4 keeps layer 1 at BF16
    assert rows["bf16"]["bytes_per_token"] == 3 * 2 * 2 * 32 * 2
    assert rows["int4"]["bytes_per_token"] == 2 * 2 * 2 * (16 + 4) + 256
    for r in rows.values():
        assert r["ppl"] > 1 and r["kl"] >= 0
    out = capsys.readouterr().out
    assert "| int4 had B16 K g32 keep 1 | sim |" in out


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
