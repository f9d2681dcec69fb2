"""Frozen model configurations read from diffusers / transformers ``config.json`` files.

Each dataclass has exactly the constructor arguments of the reference class, so a config.json
written by ``save_pretrained`` maps onto it one to one. Reading follows the ecosystem, loudly: a key
this port does not know is accepted and named in one :class:`ConfigWarning` per file (diffusers and
transformers warn and ignore too); keys known not to change what the port computes (a class's
``IGNORED_KEYS``) pass silently; a value of the wrong type, or one this port cannot run, is one
:class:`ConfigError` that names the file, the key, the value and the rule, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import warnings
from typing import Any, ClassVar, Mapping, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file that this port cannot run as written."""


class ConfigWarning(UserWarning):
    """Keys of a config file that this port does not know; they are ignored, as the reference libraries do.

    Filter it with ``warnings.filterwarnings("ignore", category=helios_jax.ConfigWarning)``."""


def read_json(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A JSON object from ``path``; a missing, unreadable or malformed file is one ConfigError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no {what} at {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
            f"fix or re-download the {what}"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-download the {what}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: a {what} holds one JSON object ({{...}}); this one holds a {type(value).__name__}")
    return value


def _freeze(value: Any) -> Any:
    """JSON gives lists where the reference has tuples; freeze them so configs stay hashable."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def config_dict(source: str | os.PathLike | Mapping[str, Any], filename: str = "config.json") -> tuple[dict, str]:
    """The raw config and where it came from: a dict as given, or the JSON file ``source`` (a folder
    means its ``filename``)."""
    if isinstance(source, Mapping):
        return dict(source), "the given dict"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise ConfigError(f"no config file at {path!r}: expected a diffusers {filename}")
    return read_json(path, filename), path


def warn_unknown(origin: str, owner: str, unknown: list[str], known: Any) -> None:
    """The one warning per file that names every key this port does not know."""
    if unknown:
        warnings.warn(
            f"{origin}: {owner} ignores the key(s) {sorted(unknown)}, which this port does not know "
            f"(the keys it reads: {sorted(known)})",
            ConfigWarning,
            stacklevel=3,
        )


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value (lists frozen to tuples) fits a dataclass field's type hint."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, h) for v, h in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """A type hint in JSON words, for the error message."""
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, hint.__name__)


def check_types(cls: type, values: Mapping[str, Any], origin: str) -> None:
    """One ConfigError naming every value whose JSON type does not fit its field (e.g. "eps": "1e-6")."""
    hints = typing.get_type_hints(cls)
    wrong = [f"{k} = {v!r} (expected {_describe(hints[k])})" for k, v in values.items() if not _matches(v, hints[k])]
    if wrong:
        raise ConfigError(
            f"{origin}: {cls.__name__} value(s) of the wrong type: {'; '.join(wrong)}. "
            "Write them as the reference library does (numbers unquoted, lists as [...])"
        )


def read_config(cls: type[C], source: str | os.PathLike | Mapping[str, Any], *, ignore: tuple[str, ...] = (),
                filename: str = "config.json") -> C:
    """Build the frozen dataclass ``cls`` from a config.json path, a folder holding one, or a dict.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are bookkeeping and are
    skipped, as are the keys named in ``ignore`` or in the class's own ``IGNORED_KEYS`` (keys the
    reference class accepts but that never change what this port computes). Any other key that is not
    a field is named in one :class:`ConfigWarning` and ignored, as diffusers and transformers do.
    Every field's type is checked, then the class checks its values.
    """
    raw, origin = config_dict(source, filename)
    return build_config(cls, raw, origin, ignore=ignore)


def build_config(cls: type[C], raw: Mapping[str, Any], origin: str, *, ignore: tuple[str, ...] = ()) -> C:
    """``read_config`` of a dict already read from ``origin`` (named in warnings and errors)."""
    ignore = (*ignore, *getattr(cls, "IGNORED_KEYS", ()))
    fields = {f.name for f in dataclasses.fields(cls)}
    warn_unknown(origin, cls.__name__, [k for k in raw if not k.startswith("_") and k not in fields and k not in ignore],
                 fields)
    values = {k: _freeze(v) for k, v in raw.items() if k in fields}
    check_types(cls, values, origin)
    try:
        return cls(**values)
    except ConfigError as err:
        if origin == "the given dict":
            raise
        raise ConfigError(f"{origin}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON types (tuples as lists), as diffusers writes it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _require(ok: bool, cls: str, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cls}.{key} = {value!r} is not supported: {rule}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The constructor arguments of diffusers' ``HeliosTransformer3DModel`` (defaults: Helios 14B)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # The reference builds RMS norms over all heads for q and k whatever this says; kept for the file.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    added_kv_proj_dim: int | None = None
    rope_dim: tuple[int, int, int] = (44, 42, 42)
    rope_theta: float = 10000.0
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    has_multi_term_memory_patch: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _require(
            len(self.patch_size) == 3 and all(isinstance(p, int) and p >= 1 for p in self.patch_size),
            name, "patch_size", self.patch_size, "three positive integers (t, h, w)",
        )
        _require(len(self.rope_dim) == 3 and all(d % 2 == 0 for d in self.rope_dim),
                 name, "rope_dim", self.rope_dim, "three even sizes (t, y, x)")
        _require(sum(self.rope_dim) == self.attention_head_dim, name, "rope_dim", self.rope_dim,
                 f"the sizes must add up to attention_head_dim = {self.attention_head_dim}")
        _require(self.added_kv_proj_dim is None, name, "added_kv_proj_dim", self.added_kv_proj_dim,
                 "Helios' attention never reads the added key/value projections; only None is supported")
        _require(self.history_scale_mode in ("scalar", "per_head"), name, "history_scale_mode",
                 self.history_scale_mode, "one of 'scalar', 'per_head'")
        _require(
            not self.has_multi_term_memory_patch or tuple(self.patch_size) == (1, 2, 2),
            name, "patch_size", self.patch_size,
            "with has_multi_term_memory_patch the reference pads mid/long history for a (1, 2, 2) patch only",
        )
        _require(self.freq_dim % 2 == 0, name, "freq_dim", self.freq_dim, "an even number")
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "ffn_dim", "num_layers"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, name, key, value, "a positive integer")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """The reference's ``out_channels or in_channels``."""
        return self.out_channels or self.in_channels

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | Mapping[str, Any]) -> "TransformerConfig":
        """Read a transformer ``config.json`` (or its folder, or a dict)."""
        return read_config(cls, source)


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """The fields of transformers' ``UMT5Config`` (or ``T5Config``, ``model_type`` "t5") that change what
    ``UMT5EncoderModel`` (``T5EncoderModel``) computes.

    Defaults are transformers' (umt5-small); the real text encoder, umt5-xxl, comes from its config.json
    (d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, vocab 256384).
    """

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # "t5" is transformers' T5EncoderModel: one relative position bias, held by the first layer, for all layers.
    model_type: str = "umt5"
    # A decoder stack would be causal; UMT5EncoderModel builds its stack from this flag as written.
    is_decoder: bool = False

    # Keys of the reference config that the encoder never reads: the decoder, dropout, init and
    # generation settings; ``dense_act_fn``/``is_gated_act``, which transformers re-derives from
    # ``feed_forward_proj``; ``tie_word_embeddings``, which it forces on (the loader takes the tied table
    # from either of its two names); ``scalable_attention``, a T5X leftover that no transformers code reads.
    IGNORED_KEYS: ClassVar[tuple[str, ...]] = (
        "architectures", "classifier_dropout", "decoder_start_token_id", "dense_act_fn", "dropout_rate",
        "dtype", "eos_token_id", "initializer_factor", "is_encoder_decoder", "is_gated_act",
        "num_decoder_layers", "output_past", "pad_token_id", "scalable_attention", "tie_word_embeddings",
        "tokenizer_class", "torch_dtype", "transformers_version", "use_cache",
        # transformers 5 writes these: the decoder's output scaling, and PretrainedConfig's generic
        # output/head settings, none of which the encoder's last hidden state depends on.
        "scale_decoder_outputs", "chunk_size_feed_forward", "id2label", "label2id", "output_attentions",
        "output_hidden_states", "problem_type", "return_dict",
    )
    # ``feed_forward_proj`` values this port runs; transformers reads "gated-gelu" as the tanh GELU.
    FEED_FORWARDS: ClassVar[tuple[str, ...]] = ("gated-gelu", "gated-gelu_new", "relu")
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("umt5", "t5")

    def __post_init__(self) -> None:
        name = type(self).__name__
        _require(self.feed_forward_proj in self.FEED_FORWARDS, name, "feed_forward_proj", self.feed_forward_proj,
                 f"the port has the gated tanh-GELU feed-forward of UMT5 and T5's ReLU one: one of {self.FEED_FORWARDS}")
        _require(self.model_type in self.MODEL_TYPES, name, "model_type", self.model_type,
                 f"a UMT5 or T5 text encoder: one of {self.MODEL_TYPES}")
        _require(not self.is_decoder, name, "is_decoder", self.is_decoder,
                 "this is the text encoder; a decoder config (causal attention) is not an encoder")
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, name, key, value, "a positive integer")
        _require(
            isinstance(self.relative_attention_num_buckets, int) and self.relative_attention_num_buckets >= 4,
            name, "relative_attention_num_buckets", self.relative_attention_num_buckets,
            "an integer >= 4 (half per direction, half of those exact)",
        )
        _require(
            self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
            name, "relative_attention_max_distance", self.relative_attention_max_distance,
            f"more than num_buckets // 4 = {self.relative_attention_num_buckets // 4}, where the log-spaced buckets start",
        )

    @property
    def gated(self) -> bool:
        """The gated GELU feed-forward (``wi_0``, ``wi_1``) rather than the ReLU one (``wi``)."""
        return self.feed_forward_proj != "relu"

    @property
    def shared_relative_bias(self) -> bool:
        """T5: one relative position bias for all layers (UMT5: one per layer)."""
        return self.model_type == "t5"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | Mapping[str, Any]) -> "UMT5Config":
        """Read a text encoder ``config.json`` (or its folder, or a dict)."""
        return read_config(cls, source)


# --- Wan VAE -------------------------------------------------------------------------------------

# The reference's encoder walks the video in chunks of this many frames after the first, whatever
# the configuration (``AutoencoderKLWan._encode``), so a video it encodes fully has 1 + 4k frames.
WAN_ENCODE_CHUNK = 4

_WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
_WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The constructor arguments of diffusers' ``AutoencoderKLWan`` (defaults: the Wan2.1 VAE Helios uses).

    ``temperal_downsample`` keeps the reference's spelling so config.json maps one to one.
    ``dropout`` is accepted and ignored: this port runs inference only, where dropout is the identity.
    ``attn_scales`` is read by the reference's Wan2.1 encoder only, and only () runs there; the decoder
    and the Wan2.2 (``is_residual``) encoder ignore it.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = _WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, name, key, value, "a positive integer")
        decoder_dim = self.decoder_base_dim
        _require(decoder_dim is None or (isinstance(decoder_dim, int) and decoder_dim >= 1),
                 name, "decoder_base_dim", decoder_dim, "None or a positive integer")
        _require(len(self.dim_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in self.dim_mult),
                 name, "dim_mult", self.dim_mult, "one or more positive integers")
        levels = len(self.dim_mult) - 1
        _require(len(self.temperal_downsample) == levels, name, "temperal_downsample", self.temperal_downsample,
                 f"one flag per downsampling level, len(dim_mult) - 1 = {levels}")
        _require(WAN_ENCODE_CHUNK % self.temporal_compression == 0, name, "temperal_downsample",
                 self.temperal_downsample,
                 f"at most two temporal halvings: the reference encodes {WAN_ENCODE_CHUNK}-frame chunks")
        _require(0.0 <= self.dropout < 1.0, name, "dropout", self.dropout, "a probability in [0, 1)")
        _require(self.is_residual or not self.attn_scales, name, "attn_scales", self.attn_scales,
                 "only () without is_residual: the reference's encoder then adds WanAttentionBlocks that its own "
                 "forward pass cannot call (they take no feat_cache), so there is no behaviour to port")
        for key in ("latents_mean", "latents_std"):
            _require(len(getattr(self, key)) == self.z_dim, name, key, getattr(self, key),
                     f"one value per latent channel, z_dim = {self.z_dim}")
        _require(all(s != 0 for s in self.latents_std), name, "latents_std", self.latents_std, "non-zero values")
        if self.patch_size is not None:
            _require(isinstance(self.patch_size, int) and self.patch_size >= 1, name, "patch_size", self.patch_size,
                     "None or a positive integer")
            p2 = self.patch_size**2
            for key in ("in_channels", "out_channels"):
                _require(getattr(self, key) % p2 == 0, name, key, getattr(self, key),
                         f"a multiple of patch_size**2 = {p2}: the channels of a patchified video")
        for key, derived in (("scale_factor_temporal", self.temporal_compression),
                             ("scale_factor_spatial", self.spatial_compression)):
            value = getattr(self, key)
            _require(value is None or value == derived, name, key, value,
                     f"the blocks compress by {derived}; the pipelines size videos with this value, so it must agree")
        if self.is_residual:
            self._check_residual_shortcuts()

    def _check_residual_shortcuts(self) -> None:
        """The residual blocks' parameter-free shortcuts regroup channels; the reference asserts they divide."""
        name = type(self).__name__
        dims = [self.base_dim * m for m in (1, *self.dim_mult)]
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            factor = (2 if self.temporal_level(i) else 1) * (4 if i < len(self.dim_mult) - 1 else 1)
            _require(c_in * factor % c_out == 0, name, "base_dim", self.base_dim,
                     f"encoder level {i}: {c_in} channels x {factor} must be divisible by {c_out}")
        up_dims = [self.decoder_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        for i, (c_in, c_out) in enumerate(zip(up_dims[:-1], up_dims[1:])):
            if i < len(self.dim_mult) - 1:
                factor = (2 if self.temporal_level(len(self.dim_mult) - 2 - i) else 1) * 4
                _require(c_out * factor % c_in == 0, name, "decoder_base_dim", self.decoder_base_dim,
                         f"decoder level {i}: {c_out} channels x {factor} must be divisible by {c_in}")

    def temporal_level(self, i: int) -> bool:
        """Whether encoder level ``i`` halves time (the last level never downsamples)."""
        return i < len(self.temperal_downsample) and bool(self.temperal_downsample[i])

    @property
    def decoder_dim(self) -> int:
        """The reference's ``decoder_base_dim or base_dim``."""
        return self.decoder_base_dim or self.base_dim

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def video_channels(self) -> int:
        """Channels of the videos the VAE encodes (``in_channels`` counts them after patchifying)."""
        return self.in_channels // self.patch**2

    @property
    def output_video_channels(self) -> int:
        return self.out_channels // self.patch**2

    def latent_frames(self, video_frames: int) -> int:
        """Latent frames of an encoded video of 1 + 4k frames: 1 + 4k / temporal_compression."""
        if video_frames < 1 or (video_frames - 1) % WAN_ENCODE_CHUNK:
            trimmed = max(1, (video_frames - 1) // WAN_ENCODE_CHUNK * WAN_ENCODE_CHUNK + 1)
            raise ValueError(
                f"a video of {video_frames} frames cannot be encoded: the Wan VAE encodes 1 + {WAN_ENCODE_CHUNK}k "
                f"frames (1, 5, 9, ..., 33, ...); trim it to {trimmed}"
            )
        return 1 + (video_frames - 1) // self.temporal_compression

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latents: 1 + temporal_compression * (T - 1) (9 -> 33)."""
        if latent_frames < 1:
            raise ValueError(f"cannot decode {latent_frames} latent frames: at least one is needed")
        return 1 + self.temporal_compression * (latent_frames - 1)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | Mapping[str, Any]) -> "VAEConfig":
        """Read a VAE ``config.json`` (or its folder, or a dict)."""
        return read_config(cls, source)
