"""Small UMT5 text encoders and T5 tokenizers built offline, for the text-encoder and prompt tests.

The tokenizer is laid out like a converted SentencePiece tokenizer (umt5-xxl's kind): a real
``nmt_nfkc`` ``Precompiled`` normalizer (taken from a SentencePiece model trained on the spot) followed
by strip and space rules, and a Metaspace pre-tokenizer. A ``Lowercase`` rule is added that the
reference's ``T5Tokenizer`` drops when it loads the file, so a reader that used tokenizer.json verbatim
would not match it.
"""

from __future__ import annotations

import io
import json
import os

import torch
from reference import randomize
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import UMT5Config, UMT5EncoderModel

PIECES = (
    [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?&;'\"-"]
    + [(c, -3.5) for c in "éüßñ中文字日本"]
    + [(w, -1.0) for w in ("▁the", "▁cat", "▁dog", "▁a", "▁and", "▁on", "▁fine", "▁kg", "▁café")]
)


def nfkc_charsmap() -> bytes:
    """SentencePiece's compiled ``nmt_nfkc`` normalization rules (what umt5's tokenizer.json carries)."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c"] * 8), model_writer=model, vocab_size=8, model_type="unigram",
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def write_tokenizer(folder: str) -> str:
    """A tokenizer/ folder (tokenizer.json, tokenizer_config.json) that transformers reads as T5Tokenizer."""
    tokenizer = Tokenizer(models.Unigram(PIECES, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(nfkc_charsmap()),
        normalizers.Lowercase(),
        normalizers.Strip(left=False, right=True),
        normalizers.Replace(Regex(" {2,}"), "▁"),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return folder


def umt5_model(seed: int = 0, **overrides) -> UMT5EncoderModel:
    """A small random-weight ``UMT5EncoderModel`` (float32, eval mode)."""
    settings = dict(
        vocab_size=len(PIECES), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return randomize(UMT5EncoderModel(UMT5Config(**settings)), seed)
