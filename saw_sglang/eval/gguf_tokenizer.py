"""A SentencePiece-BPE tokenizer rebuilt from a GGUF's vocabulary and scores.

transformers 5.12 turns a Gemma 3 GGUF's `llama` (SentencePiece-BPE) vocabulary into
a Unigram model, which segments words into odd pieces ("▁c ap it al") and adds no
BOS: perplexities come out several times too high. Merges ordered by score, as
llama.cpp applies them, restore the model's own segmentation."""

from __future__ import annotations


def spm_bpe_tokenizer(gguf_path: str):
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    r = GGUFReader(gguf_path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    tokens, scores, types = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # control / user-defined
    merges = generate_merges(vocab, list(zip(tokens, scores)), skip_tokens=special)
    bos, eos, unk = (tokens[int(f(f"tokenizer.ggml.{k}_token_id"))] for k in ("bos", "eos", "unknown"))
    tk = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([t for t in special])
    if f("tokenizer.ggml.add_bos_token"):
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk)
