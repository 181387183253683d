"""The SentencePiece-BPE tokenizer rebuilt from GGUF vocabulary + scores (Gemma 3 preset)."""

from saw_sglang.eval.gguf_tokenizer import spm_bpe_tokenizer


def _write_gguf(path, tokens, scores, types):
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_merges_follow_scores(tmp_path):
    # Higher score = earlier merge. "▁cap" + "ital" must win over "▁c" "ap" ... pieces.
    pieces = ["▁", "c", "a", "p", "i", "t", "l", "▁c", "ap", "it", "al", "▁cap", "ital", "▁capital",
              "x", "y", "xy"]
    score = {"▁capital": -1.0, "▁cap": -2.0, "ital": -2.5, "it": -3.0, "al": -3.5, "ap": -4.0,
             "▁c": -5.0, "xy": -6.0}
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + pieces
    scores = [-1000.0] * 4 + [score.get(p, -100.0) for p in pieces]
    types = [3, 3, 3, 2] + [1] * len(pieces)
    _write_gguf(tmp_path / "t.gguf", tokens, scores, types)
    tok = spm_bpe_tokenizer(str(tmp_path / "t.gguf"))
    ids = tok(" capital xy capit").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "▁capital", "▁", "xy", "▁cap", "it"]
    assert tok(" capital", add_special_tokens=False).input_ids == [tokens.index("▁capital")]
    assert tok.bos_token_id == 2 and tok.decode(ids, skip_special_tokens=True) == " capital xy capit"
