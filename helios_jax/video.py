"""Images and videos in and out: reading conditioning inputs, writing mp4 files and contact sheets.

Inputs are prepared as diffusers' ``VideoProcessor`` prepares them (PIL Lanczos resize to the
requested size, RGB, values in [-1, 1]). Outputs are written atomically: frames stream into a
temporary file beside the target, which is renamed into place only when the video is complete, so an
interrupted run (Ctrl-C included) never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageLike = Union[str, os.PathLike, "PILImage.Image", np.ndarray]


class MediaError(ValueError):
    """An input image or video that cannot be read, or an output path that cannot be written."""


def _pil():
    from PIL import Image

    return Image


def _to_model_range(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [-1, 1], as ``pil_to_numpy`` followed by ``normalize``."""
    return (frames_uint8.astype(np.float32) / 255.0) * 2.0 - 1.0


def _fit(image, height: int, width: int) -> np.ndarray:
    """A PIL image resized (Lanczos, only when needed) and converted to uint8 RGB (H, W, 3)."""
    Image = _pil()
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(image: ImageLike, height: int, width: int) -> np.ndarray:
    """An image as (height, width, 3) float32 in [-1, 1], from a path, a PIL image or a uint8 array."""
    Image = _pil()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise MediaError(f"an image array must be uint8 (H, W, 3 or 4); got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        path = os.fspath(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as err:
            raise MediaError(f"cannot read the image {path!r}: {err}") from err
    return _to_model_range(_fit(image, height, width))


def load_video(video: str | os.PathLike | Sequence, height: int, width: int) -> np.ndarray:
    """A video as (frames, height, width, 3) float32 in [-1, 1], from a file or a list of frames."""
    Image = _pil()
    if isinstance(video, (str, os.PathLike)):
        frames = list(_decode_frames(os.fspath(video)))
    else:
        frames = [Image.fromarray(f) if isinstance(f, np.ndarray) else f for f in video]
    if not frames:
        raise MediaError(f"the video {video!r} has no frames")
    return _to_model_range(np.stack([_fit(f, height, width) for f in frames]))


def _decode_frames(path: str) -> Iterable:
    import av

    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                yield frame.to_image()
    except (av.error.FFmpegError, OSError, IndexError) as err:
        raise MediaError(f"cannot read the video {path!r}: {err}") from err


def _publish(partial: str, path: str) -> None:
    """Move a finished temporary file into place with ordinary permissions (mkstemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)


def check_writable(path: str | os.PathLike) -> str:
    """The absolute output path, after checking that its folder exists and is writable (before any work)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise MediaError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MediaError(f"cannot write {path}: the folder {folder} is not writable")
    if os.path.isdir(path):
        raise MediaError(f"cannot write {path}: it is a folder")
    return path


class Mp4Writer:
    """Streams uint8 RGB frames (T, H, W, 3) into an H.264 mp4, renamed into place on success.

    ``with Mp4Writer(path, fps) as out: out.write(chunk)`` — the file appears under ``path`` only when
    the block ends without an exception.
    """

    def __init__(self, path: str | os.PathLike, fps: int, crf: int = 18):
        self.path = check_writable(path)
        self.fps, self.crf = fps, crf
        self.frames_written = 0
        self._container = self._stream = None
        fd, self._partial = tempfile.mkstemp(prefix=".partial-", suffix=".mp4", dir=os.path.dirname(self.path))
        os.close(fd)

    def write(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise MediaError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}")
        if self._container is None:
            self._container = av.open(self._partial, "w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=self.fps, options={"crf": str(self.crf)})
            self._stream.height, self._stream.width = frames.shape[1:3]
            self._stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames_written += len(frames)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._container is not None:
                if exc_type is None:
                    for packet in self._stream.encode():
                        self._container.mux(packet)
                self._container.close()
            if exc_type is None:
                if self.frames_written == 0:
                    raise MediaError(f"no frames were written to {self.path}")
                _publish(self._partial, self.path)
        finally:
            if os.path.exists(self._partial):
                os.remove(self._partial)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 24) -> str:
    """Write a whole uint8 (T, H, W, 3) video at once; returns the absolute path."""
    with Mp4Writer(path, fps) as out:
        out.write(frames)
    return out.path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3)."""
    return np.stack([np.asarray(f.convert("RGB")) for f in _decode_frames(os.fspath(path))])


def contact_sheet(frames: Sequence[np.ndarray], columns: int = 4, gap: int = 4) -> np.ndarray:
    """Frames (each uint8 H x W x 3) tiled row by row on a white background."""
    if not frames:
        raise MediaError("a contact sheet needs at least one frame")
    h, w, _ = frames[0].shape
    rows = -(-len(frames) // columns)
    cols = min(columns, len(frames))
    sheet = np.full((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        sheet[gap + r * (h + gap): gap + r * (h + gap) + h, gap + c * (w + gap): gap + c * (w + gap) + w] = frame
    return sheet


def write_png(path: str | os.PathLike, image: np.ndarray) -> str:
    """Write a uint8 (H, W, 3) image atomically; returns the absolute path."""
    path = check_writable(path)
    fd, partial = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    try:
        _pil().fromarray(image).save(partial, format="PNG")
        _publish(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path
