"""Chunks of frames as fragmented MP4 that a browser's Media Source Extensions play as they arrive.

PyAV (FFmpeg's mp4 muxer with ``movflags=frag_keyframe+empty_moov+default_base_moof``) does the muxing. One
muxer for the whole stream would hold each chunk's fragment back until the next chunk's first frame arrives
(FFmpeg writes a fragment when the next one starts, and PyAV cannot ask it to flush): a chunk would reach the
viewer one chunk late. So each chunk is encoded and muxed by its own encoder and muxer, starting with a
keyframe, and ``frag_discont`` with the chunk's first timestamp (``fragment_index`` its sequence number) places
its fragment on the one timeline: the first chunk's bytes carry the init segment (``ftyp`` + ``moov``), the
later ones only their ``moof`` + ``mdat``, and all of them joined in order are one playable MP4.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import numpy as np

from helios_jax.video import MediaError

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer"
INIT_BOXES = (b"ftyp", b"moov")


def _boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """The top-level MP4 boxes of ``data`` as (type, whole box)."""
    out, at = [], 0
    while at + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        if size < 8:
            raise MediaError(f"the muxer wrote a {kind!r} box of size {size}; expected 8 bytes or more")
        out.append((kind, data[at:at + size]))
        at += size
    return out


def _codec_string(init: bytes) -> str:
    """``avc1.PPCCLL``: the profile, constraint flags and level bytes of the init segment's avcC box."""
    at = init.find(b"avcC")
    if at < 0 or len(init) < at + 8:
        raise MediaError("the muxer wrote no avcC box: cannot name the H.264 profile for the player")
    return "avc1." + init[at + 5:at + 8].hex()


class FragmentedMp4:
    """A stream's chunks, one ``encode(frames)`` call each, to the bytes a player appends in order.

    ``codec`` is the RFC 6381 string (``avc1.PPCCLL``, from the encoder's own avcC) that MediaSource needs
    before the first byte is appended; it is known once the first chunk is encoded.
    """

    def __init__(self, fps: int = 24, crf: int = 18):
        self.fps, self.crf = fps, crf
        self.frames = 0  # frames muxed so far: the next chunk's first timestamp
        self.chunks = 0
        self.codec: str | None = None

    def encode(self, frames: np.ndarray) -> bytes:
        """One chunk, uint8 (t, H, W, 3), as one fragment (the first one after the init segment)."""
        import av

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise MediaError(f"a chunk must be uint8 (t, H, W, 3) with t >= 1; got {frames.dtype} {frames.shape}")
        out = io.BytesIO()
        options = {"movflags": MOVFLAGS, "fragment_index": str(self.chunks + 1), "avoid_negative_ts": "disabled"}
        with av.open(out, "w", format="mp4", options=options) as container:
            # zerolatency: no B-frames and no look-ahead, so every frame is out when the chunk's last one is in.
            stream = container.add_stream("libx264", rate=self.fps, options={
                "crf": str(self.crf), "tune": "zerolatency", "g": str(max(len(frames), 1) + 1)})
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = stream.time_base = Fraction(1, self.fps)
            for i, frame in enumerate(frames):
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
                picture.pts = self.frames + i
                picture.time_base = Fraction(1, self.fps)
                container.mux(stream.encode(picture))
            container.mux(stream.encode())
        data = out.getvalue()
        if self.codec is None:
            self.codec = _codec_string(data)
        if self.chunks:
            data = b"".join(box for kind, box in _boxes(data) if kind not in INIT_BOXES)
        self.frames += len(frames)
        self.chunks += 1
        return data
