"""Prompt text to token ids exactly as the reference pipelines prepare it, without torch or transformers.

Cleaning is diffusers' Helios ``prompt_clean``: ftfy's ``fix_text``, HTML entities unescaped twice,
stripped, and every run of Unicode white space folded into one space.

Tokenizing reads the checkpoint's ``tokenizer/tokenizer.json`` with the ``tokenizers`` library and sets
it up the way transformers' ``T5Tokenizer`` does when the reference pipeline loads that folder: of the
file it keeps the Unigram vocabulary, the added (special) tokens and a SentencePiece ``Precompiled``
normalizer, if any; words are split on white space and each gets the "▁" prefix (Metaspace); "</s>"
ends every prompt. The ids therefore equal the reference's whatever other normalizers and
pre-tokenizers tokenizer.json lists (converted SentencePiece files add a strip and a space rule).
"""

from __future__ import annotations

import base64
import html
import os
import re
from typing import Any, Sequence

import ftfy
import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from helios_jax.config import ConfigError, read_json, warn_unknown

# Unicode's White_Space property: what the reference's ``regex`` ``\s`` folds. (Python's ``re`` ``\s``
# also matches U+001C..U+001F, which the reference keeps.)
_WHITE_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
# ``T5Tokenizer`` builds its Unigram model with this unknown-token id, whatever the file says.
_T5_UNK_ID = 2


def clean_prompt(text: str) -> str:
    """The reference's ``prompt_clean``: fix mojibake, unescape HTML twice, fold white space."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITE_SPACE.sub(" ", text).strip()


class TokenizerError(ConfigError):
    """A tokenizer folder that cannot be read as the reference's T5 tokenizer."""


# tokenizer_config.json keys that the reference's T5Tokenizer keeps but that never change the ids or the mask
# of an encoded prompt: decoding settings, special tokens T5 never inserts, and bookkeeping transformers writes.
_SILENT_TOKENIZER_KEYS = (
    "add_bos_token", "add_eos_token", "added_tokens_decoder", "additional_special_tokens", "backend", "bos_token",
    "clean_up_tokenization_spaces", "cls_token", "extra_ids", "extra_special_tokens", "is_local",
    "local_files_only", "mask_token", "model_input_names", "name_or_path", "sep_token",
    "sp_model_kwargs", "spaces_between_special_tokens", "special_tokens_map_file", "tokenizer_class",
    "tokenizer_file", "unk_token", "vocab_file",
)
_READ_TOKENIZER_KEYS = ("eos_token", "pad_token", "padding_side", "truncation_side", "split_special_tokens",
                        "model_max_length")
# transformers writes 1e30 (VERY_LARGE_INTEGER) for "no limit", as the published Helios tokenizers do.
_NO_LIMIT = 10**12
TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")


def _token_text(value: Any, key: str, path: str) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise TokenizerError(f"{path}: {key} = {value!r} is neither a token string nor an AddedToken dict")


class PromptTokenizer:
    """Cleaned prompts -> (ids, attention mask), both (batch, max_length) int32, right-padded.

    Long prompts are cut to ``max_length`` tokens including the closing "</s>", as the reference's
    ``truncation=True`` does; the mask is 1 on the prompt's tokens and 0 on padding.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token: str = "</s>", pad_token: str = "<pad>",
                 model_max_length: int | None = None):
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length  # the most tokens the model was trained on (None: no limit)
        self.eos_id = self._id(eos_token, "eos_token")
        self.pad_id = self._id(pad_token, "pad_token")
        self.pad_token = pad_token
        tokenizer.post_processor = processors.TemplateProcessing(
            single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token], special_tokens=[(eos_token, self.eos_id)]
        )

    def _id(self, token: str, role: str) -> int:
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise TokenizerError(f"the {role} {token!r} is not in the tokenizer's vocabulary")
        return index

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PromptTokenizer":
        """Read a diffusers ``tokenizer/`` folder (``tokenizer.json`` and ``tokenizer_config.json``)."""
        folder = os.fspath(path)
        file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(
                f"no tokenizer.json in {folder!r}: the prompt path reads the tokenizers-library file that "
                "diffusers checkpoints ship in tokenizer/ (a folder with only spiece.model must be converted first)"
            )
        config = _read_tokenizer_config(folder)
        spec = read_json(file, "tokenizer.json")
        model = spec.get("model") or {}
        if model.get("type") != "Unigram":
            raise TokenizerError(f"{file}: model type {model.get('type')!r}; the UMT5 tokenizer is a Unigram model")

        try:
            tokenizer = Tokenizer.from_file(file)
        except Exception as err:  # the tokenizers library raises a bare Exception for a file it cannot build
            raise TokenizerError(f"{file}: the tokenizers library cannot read it ({err}); re-download the tokenizer") from None
        tokenizer.model = models.Unigram([tuple(piece) for piece in model["vocab"]], unk_id=_T5_UNK_ID, byte_fallback=False)
        tokenizer.normalizer = _precompiled_normalizer(spec.get("normalizer"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
        )

        config_file = os.path.join(folder, "tokenizer_config.json")
        for side in ("padding_side", "truncation_side"):
            if config.get(side, "right") != "right":
                raise TokenizerError(
                    f"{config_file}: {side} = {config[side]!r}; the reference pipelines keep each prompt's tokens "
                    "first (embeddings past its length are zeroed), so only 'right' is supported"
                )
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        return cls(
            tokenizer,
            eos_token=_token_text(config.get("eos_token", "</s>"), "eos_token", config_file),
            pad_token=_token_text(config.get("pad_token", "<pad>"), "pad_token", config_file),
            model_max_length=_model_max_length(config.get("model_max_length"), config_file),
        )

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length = {max_length!r} must be a positive integer (the reference's default is 512)")
        self._tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        self._tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token, length=max_length)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(encodings), max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(len(encodings), max_length)
        return ids, mask


def _model_max_length(value: Any, path: str) -> int | None:
    """tokenizer_config.json's ``model_max_length``: a positive integer, or None for absent or transformers'
    "no limit" (1e30)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= _NO_LIMIT):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TokenizerError(f"{path}: model_max_length = {value!r} must be a positive integer")
    return value


def _precompiled_normalizer(spec: dict | None) -> normalizers.Normalizer | None:
    """The first SentencePiece ``Precompiled`` normalizer of a tokenizer.json (the only one T5Tokenizer keeps)."""
    if not spec:
        return None
    parts = spec["normalizers"] if spec.get("type") == "Sequence" else [spec]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return normalizers.Precompiled(base64.b64decode(part["precompiled_charsmap"]))
    return None


def _read_tokenizer_config(folder: str) -> dict[str, Any]:
    """tokenizer_config.json (empty when absent, as transformers allows), its keys checked."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path, "tokenizer_config.json")
    name = config.get("tokenizer_class", "T5Tokenizer")
    if name not in TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{path}: tokenizer_class = {name!r} is not supported: the prompt path reproduces transformers' "
            f"{' / '.join(TOKENIZER_CLASSES)} (what UMT5 checkpoints ship); use umt5-xxl's tokenizer folder"
        )
    if not isinstance(config.get("split_special_tokens", False), bool):
        raise TokenizerError(f"{path}: split_special_tokens = {config['split_special_tokens']!r} must be true or false")
    known = (*_READ_TOKENIZER_KEYS, *_SILENT_TOKENIZER_KEYS)
    warn_unknown(path, "the T5 tokenizer", [k for k in config if k not in known], _READ_TOKENIZER_KEYS)
    return config
