"""The prompt path against diffusers' HeliosPipeline: cleaning, tokenizing, encode_prompt; interactive prompts."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import rel_err, to_numpy
from umt5_fixtures import umt5_model, write_tokenizer

import helios_jax as hj
from helios_jax.prompts import ChunkPrompt, lerp, plan_prompt_chunks

PROMPTS = [
    "A cat &amp;amp; a dog &lt;b&gt;on&lt;/b&gt; the caf&eacute; terrace",  # HTML entities, escaped twice
    "  the\tcat\n\n and\u3000the\u00a0dog\u2028 on\x1cthe mat  ",  # odd white space (\x1c is not folded)
    "日本の猫 and 中文字: naïve ﬁne ①㎏ ＴＨＥ ｃａｔ e\u0301 x\u200by",  # non-ASCII, NFKC-normalized
    "the â€œmojibakeâ€\x9d cat",  # ftfy repairs
    "the cat and the dog " * 30,  # longer than the short max_sequence_lengths below
    "dog " * 600,  # longer than 512 tokens
    "",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Helios pipeline saved with save_pretrained, and the reference pipeline read back from it."""
    from diffusers import AutoencoderKLWan, HeliosPipeline, HeliosScheduler, HeliosTransformer3DModel
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("helios_tiny")
    tokenizer = AutoTokenizer.from_pretrained(write_tokenizer(str(root / "tokenizer_src")))
    text_encoder = umt5_model(seed=7, num_layers=2, relative_attention_num_buckets=16, relative_attention_max_distance=40)
    torch.manual_seed(0)
    transformer = HeliosTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, text_dim=32, freq_dim=8,
        ffn_dim=16, num_layers=1, rope_dim=(4, 2, 2),
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    pipe = HeliosPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=HeliosScheduler(),
                          transformer=transformer)
    folder = root / "ckpt"
    pipe.save_pretrained(folder, max_shard_size="20KB")
    return folder, HeliosPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return hj.PromptEncoder.from_pretrained(checkpoint[0])


def test_clean_prompt_matches_reference():
    from diffusers.pipelines.helios.pipeline_helios import prompt_clean

    extra = ["\x1c a \x1f", "\u2007x\u205fy\u180ez", "&amp;#x41;", "plain", "  ", "a\r\n\x0b\x0cb\x85c"]
    for text in PROMPTS + extra:
        assert hj.clean_prompt(text) == prompt_clean(text), repr(text)


def test_white_space_folding_is_unicode_white_space():
    """Every code point the reference's ``regex`` ``\\s`` matches is folded, and no other."""
    import regex

    from helios_jax.tokenizer import _WHITE_SPACE

    every = "".join(map(chr, range(sys.maxunicode + 1)))
    assert "".join(_WHITE_SPACE.findall(every)) == "".join(regex.findall(r"\s+", every))


@pytest.mark.parametrize("max_length", [16, 64])
def test_tokenizer_matches_reference(tmp_path, max_length):
    """Ids and masks equal transformers' T5Tokenizer reading the same folder, although the file's own
    normalizers (which T5Tokenizer replaces) would tokenize some prompts differently."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = write_tokenizer(str(tmp_path / "tokenizer"))
    reference = AutoTokenizer.from_pretrained(folder)
    texts = [hj.clean_prompt(p) for p in PROMPTS] + ["the </s> cat <pad> <unk>", "ﬁne\u200b\u200b café"]
    want = reference(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                     return_attention_mask=True, return_tensors="np")
    ids, mask = hj.PromptTokenizer.from_pretrained(folder)(texts, max_length)
    np.testing.assert_array_equal(ids, want.input_ids)
    np.testing.assert_array_equal(mask, want.attention_mask)
    assert (mask.sum(1) == max_length).any() and (mask.sum(1) < max_length).any()  # truncated and padded rows

    verbatim = Tokenizer.from_file(f"{folder}/tokenizer.json")
    assert any(verbatim.encode(t).ids[:max_length - 1] != list(row[: m.sum() - 1])
               for t, row, m in zip(texts, want.input_ids, want.attention_mask))


def _compare(got, want, name):
    assert got is not None and want is not None, name
    want = to_numpy(want)
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    np.testing.assert_array_equal(got == 0, want == 0)  # the same positions zeroed past each prompt's length
    assert rel_err(got, want) <= 1e-5, (name, rel_err(got, want))


@pytest.mark.parametrize(
    "prompt,negative,guidance,per_prompt,length",
    [
        (PROMPTS, None, True, 1, 512),  # the default length; the last prompts exceed it
        (PROMPTS[:3], ["a bad one", "caf&eacute; &lt;négatif&gt;", ""], True, 2, 24),
        (PROMPTS[2], "  low   quality\n", True, 3, 16),
        (PROMPTS[:2], None, False, 1, 24),
    ],
    ids=["list-512", "negative-list-x2-24", "str-x3-16", "no-guidance-24"],
)
def test_encode_prompt_matches_pipeline(checkpoint, encoder, prompt, negative, guidance, per_prompt, length):
    _, pipe = checkpoint
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt(prompt, negative_prompt=negative, do_classifier_free_guidance=guidance,
                                            num_videos_per_prompt=per_prompt, max_sequence_length=length)
    got, got_neg = encoder.encode_prompt(prompt, negative_prompt=negative, do_classifier_free_guidance=guidance,
                                         num_videos_per_prompt=per_prompt, max_sequence_length=length)
    _compare(got, want, "prompt_embeds")
    if guidance:
        _compare(got_neg, want_neg, "negative_prompt_embeds")
    else:
        assert got_neg is None and want_neg is None


def test_encode_dtype_and_default_length(encoder):
    embeds = encoder.encode(["the cat", "a dog"], dtype=jnp.bfloat16)
    assert embeds.shape == (2, 512, 32) and embeds.dtype == jnp.bfloat16


def test_a_shorter_model_max_length_is_the_default_length(checkpoint, encoder, tmp_path):
    """A tokenizer whose model_max_length is under 512 (the nano model's) sets the length a prompt is encoded to
    when none is given: the same embeddings as asking for that length."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(os.path.join(checkpoint[0], "tokenizer"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8}))
    short = hj.PromptEncoder(encoder.config, encoder.params, hj.PromptTokenizer.from_pretrained(folder))
    assert (encoder.max_sequence_length, short.max_sequence_length) == (512, 8)
    np.testing.assert_array_equal(np.asarray(short.encode("the cat")),
                                  np.asarray(encoder.encode("the cat", max_sequence_length=8)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt=["a", "b"], negative_prompt=["x"]), ValueError, "negative_prompt has 1 prompts but prompt has 2"),
        (dict(prompt=3), TypeError, "prompt must be a str or a non-empty list of str"),
        (dict(prompt=[]), TypeError, "prompt must be"),
        (dict(prompt="a", negative_prompt=[1]), TypeError, "negative_prompt must be"),
        (dict(prompt="a", max_sequence_length=0), ValueError, "max_sequence_length = 0 must be a positive integer"),
        (dict(prompt="a", num_videos_per_prompt=0), ValueError, "num_videos_per_prompt = 0"),
    ],
)
def test_encode_prompt_errors(encoder, kwargs, error, match):
    with pytest.raises(error, match=match):
        encoder.encode_prompt(**kwargs)


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        hj.PromptTokenizer.from_pretrained(tmp_path)
    folder = write_tokenizer(str(tmp_path / "left"))
    (tmp_path / "left" / "tokenizer_config.json").write_text('{"padding_side": "left"}')
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        hj.PromptTokenizer.from_pretrained(folder)


# Interactive prompts.


def test_plan_switches_without_interpolation():
    plan = plan_prompt_chunks([0, 2, 3], num_chunks=5)
    assert [(c.source, c.target, c.weight) for c in plan] == [
        (0, 0, 0.0), (0, 0, 0.0), (1, 1, 0.0), (2, 2, 0.0), (2, 2, 0.0)
    ]


def test_plan_interpolates_at_each_switch():
    """Over n chunks from the previous prompt: weights 0, 1/(n-1), ..., 1, then the prompt itself."""
    plan = plan_prompt_chunks([0, 3, 7], num_chunks=11, interpolation_chunks=3)
    assert plan == (
        ChunkPrompt(0, 0, 0.0), ChunkPrompt(0, 0, 0.0), ChunkPrompt(0, 0, 0.0),
        ChunkPrompt(0, 1, 0.0), ChunkPrompt(0, 1, 0.5), ChunkPrompt(0, 1, 1.0), ChunkPrompt(1, 1, 0.0),
        ChunkPrompt(1, 2, 0.0), ChunkPrompt(1, 2, 0.5), ChunkPrompt(1, 2, 1.0), ChunkPrompt(2, 2, 0.0),
    )
    plan = plan_prompt_chunks([0, 1], num_chunks=5, interpolation_chunks=4)  # a span exactly n chunks long is fine
    assert [c.weight for c in plan[1:]] == pytest.approx([0, 1 / 3, 2 / 3, 1])


@pytest.mark.parametrize(
    "starts,num_chunks,n,match",
    [
        ([0, 2, 4], 6, 3, r"interpolation over 3 chunks is longer than prompt 1's span of 2 chunk\(s\) \(2..3\)"),
        ([0, 4], 6, 3, r"longer than prompt 1's span of 2 chunk\(s\) \(4..5\)"),
        ([1, 3], 6, 0, "the first prompt starts at chunk 1"),
        ([0, 3, 3], 6, 0, "prompts 1 and 2 both start at chunk 3"),
        ([0, 4, 2], 6, 0, "starts must increase: prompt 2 starts at chunk 2, before prompt 1 at 4"),
        ([0, 6], 6, 0, "prompt 1 starts at chunk 6 but the video has only 6 chunks"),
        ([0, 3], 6, 1, "interpolation_chunks = 1 is not supported"),
        ([0, 3], 6, -2, "interpolation_chunks = -2 is not supported"),
        ([], 6, 0, "no prompts"),
        ([0], 0, 0, "num_chunks = 0 must be a positive integer"),
    ],
)
def test_plan_errors(starts, num_chunks, n, match):
    with pytest.raises(ValueError, match=match):
        plan_prompt_chunks(starts, num_chunks, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [2, 3, 4, 7])
def test_lerp_matches_the_official_blend(dtype, steps):
    """The official inference blends with torch.lerp over torch.linspace(0, 1, steps) cast to the embeddings' dtype."""
    generator = torch.Generator().manual_seed(steps)
    a, b = (torch.randn(1, 6, 8, generator=generator).to(dtype) for _ in range(2))
    official = torch.lerp(a, b, torch.linspace(0, 1, steps=steps).unsqueeze(1).unsqueeze(2).to(a)).chunk(steps)
    jax_dtype = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    ja, jb = (jnp.asarray(to_numpy(t), jax_dtype) for t in (a, b))
    for position, want in enumerate(official):
        got = np.asarray(lerp(ja, jb, position / (steps - 1)), np.float32)
        if dtype == torch.float32:
            assert np.abs(got - to_numpy(want)).max() <= 1e-6
        else:
            np.testing.assert_array_equal(got, to_numpy(want))


def test_interactive_schedule_gives_each_chunk_its_embeddings(encoder):
    prompts = ["the cat", "a dog &amp; a cat", "日本 café"]
    schedule = encoder.encode_interactive(prompts, [0, 2, 5], num_chunks=8, interpolation_chunks=3, max_sequence_length=16)
    rows = encoder.encode(prompts, max_sequence_length=16)
    assert len(schedule) == 8 and schedule[0].shape == (1, 16, 32)
    expected = [rows[0], rows[0], rows[0], (rows[0] + rows[1]) / 2, rows[1], rows[1], (rows[1] + rows[2]) / 2, rows[2]]
    for chunk, want in enumerate(expected):
        np.testing.assert_allclose(np.asarray(schedule[chunk][0]), np.asarray(want), atol=1e-6, err_msg=f"chunk {chunk}")
    assert len(schedule[1:4]) == 3
    with pytest.raises(ValueError, match="got 2 prompts but 3 start chunks"):
        encoder.encode_interactive(prompts[:2], [0, 2, 5], num_chunks=8)
