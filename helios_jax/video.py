"""Images and videos in and out: reading conditioning inputs, writing mp4 files and contact sheets.

Inputs are prepared as diffusers' ``VideoProcessor`` prepares them (PIL Lanczos resize to the
requested size, RGB, values in [-1, 1]). One contract for every caller: an image or video is a path, PIL
image(s) or uint8 array(s); ``fit_*`` give uint8 at the requested size, ``load_*`` the model's floats. Outputs are written atomically: frames stream into a
temporary file beside the target, which is renamed into place only when the video is complete, so an
interrupted run (Ctrl-C included) never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import warnings
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np

from helios_jax.diskspace import disk_full_as_error

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageLike = Union[str, os.PathLike, "PILImage.Image", np.ndarray]


PARTIALS_MADE: set[str] = set()  # this process's temporary files not yet renamed or removed
PARTIAL_PREFIX = ".partial-"  # + host + "-" + pid + "-": the names of the temporary files


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


def _as_pil(frame, what: str):
    """A PIL image from a PIL image or a uint8 (H, W, 3 or 4) array; anything else is one MediaError."""
    Image = _pil()
    if isinstance(frame, Image.Image):
        return frame
    if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] in (3, 4) \
            and min(frame.shape[:2]) > 0:
        return Image.fromarray(frame)
    shape = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
    raise MediaError(f"{what} must be a file path, a PIL image or a uint8 (H, W, 3 or 4) array of values 0-255; "
                     f"got {shape} (floats in [-1, 1] are what the loader returns, not what it takes)")


def _input_file(path: str | os.PathLike, what: str) -> str:
    """A path to read, checked to be a regular file (a folder, a pipe or a device would fail late, or hang)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"cannot read the {what} {path!r}: no such file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise MediaError(f"cannot read the {what} {path!r}: not a regular file (a folder, a pipe or a device)")
    return path


def fit_image(image: ImageLike, height: int, width: int) -> np.ndarray:
    """An image as uint8 (height, width, 3), from a path, a PIL image or a uint8 array (resized as needed)."""
    Image = _pil()
    if isinstance(image, (str, os.PathLike)):
        path = _input_file(image, "image")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise MediaError(f"cannot read the image {path!r}: {err}") from err
    return _fit(_as_pil(image, "an image"), height, width)


def fit_video(video: str | os.PathLike | Sequence | np.ndarray, height: int, width: int) -> np.ndarray:
    """A video as uint8 (frames, height, width, 3), from a file, a uint8 (T, H, W, 3) array or a list of frames
    (each a PIL image or a uint8 array)."""
    if isinstance(video, (str, os.PathLike)):
        frames = list(_decode_frames(_input_file(video, "video")))
    elif isinstance(video, np.ndarray) and video.ndim != 4:
        raise MediaError(f"a video array must be uint8 (T, H, W, 3); got {video.dtype} {video.shape}")
    elif isinstance(video, (Sequence, np.ndarray)) and not isinstance(video, str):
        frames = [_as_pil(f, "each video frame") for f in video]
    else:
        raise MediaError(f"a video must be a file path, a uint8 (T, H, W, 3) array or a list of frames; "
                         f"got {type(video).__name__}")
    if not frames:
        raise MediaError(f"the video {video if isinstance(video, (str, os.PathLike)) else '(frames)'} has no frames")
    return np.stack([_fit(f, height, width) for f in frames])


def load_image(image: ImageLike, height: int, width: int) -> np.ndarray:
    """An image as (height, width, 3) float32 in [-1, 1] (what the VAE takes), from what :func:`fit_image` takes."""
    return _to_model_range(fit_image(image, height, width))


def load_video(video: str | os.PathLike | Sequence | np.ndarray, height: int, width: int) -> np.ndarray:
    """A video as (frames, height, width, 3) float32 in [-1, 1], from what :func:`fit_video` takes."""
    return _to_model_range(fit_video(video, height, width))


def _decode_frames(path: str) -> Iterable:
    import av

    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                yield frame.to_image()
    except (av.error.FFmpegError, OSError, IndexError) as err:
        raise MediaError(f"cannot read the video {path!r}: {err}") from err


def _partial_prefix(pid: int) -> str:
    """The name prefix of the partial files of process ``pid`` on this host: a later run can tell whose they are."""
    return f"{PARTIAL_PREFIX}{socket.gethostname()}-{pid}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale_partials(folder: str) -> list[str]:
    """Remove the partial files that killed runs (SIGKILL, a power cut) of this host left in ``folder``: those
    whose process is gone. Returns the partial files left there that cannot be proved stale (another host's, a
    running process's, or named without a process), after warning once that names them."""
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(PARTIAL_PREFIX))
    except OSError:
        return []
    removed, kept = [], []
    for name in names:
        path = os.path.join(folder, name)
        pid = _partial_pid(name)
        if pid is not None and pid != os.getpid() and not _alive(pid) and path not in PARTIALS_MADE:
            try:
                os.remove(path)
                removed.append(name)
                continue
            except OSError:
                pass
        if path not in PARTIALS_MADE:
            kept.append(path)
    if removed:
        warnings.warn(f"removed {len(removed)} partial file(s) that killed runs left in {folder}: "
                      f"{', '.join(removed)}", stacklevel=3)
    if kept:
        warnings.warn(f"partial file(s) of other or unknown runs in {folder}, kept (remove them by hand if no run "
                      f"is writing there): {', '.join(kept)}", stacklevel=3)
    return kept


def _partial_pid(name: str) -> int | None:
    """The process id in a partial file's name, when it is this host's (else None: not provably stale)."""
    mine = _partial_prefix(0)[:-2]  # PARTIAL_PREFIX + host + "-"
    rest = name[len(mine):] if name.startswith(mine) else ""
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _partial_file(path: str, suffix: str) -> str:
    """A new hidden temporary file beside ``path``, recorded until :func:`_discard` (or a rename) ends it; what
    killed runs left beside it is cleared (or named) first."""
    clear_stale_partials(os.path.dirname(path))
    fd, partial = tempfile.mkstemp(prefix=_partial_prefix(os.getpid()), suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    PARTIALS_MADE.add(partial)
    return partial


def _discard(partial: str) -> None:
    if os.path.exists(partial):
        os.remove(partial)
    PARTIALS_MADE.discard(partial)


def _publish(partial: str, path: str) -> None:
    """Move a finished temporary file into place with ordinary permissions (mkstemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, path)


def check_writable(path: str | os.PathLike, suffix: str) -> str:
    """The absolute output path, after checking (before any work) that it names a ``suffix`` file in a
    writable folder, and that anything already there is a regular file (never a folder or a device)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.splitext(path)[1].lower() != suffix:
        raise MediaError(f"cannot write {path}: the name must end in {suffix} (this writes a {suffix[1:]} file)")
    if not os.path.isdir(folder):
        raise MediaError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MediaError(f"cannot write {path}: the folder {folder} is not writable")
    if os.path.lexists(path) and not (os.path.exists(path) and stat.S_ISREG(os.stat(path).st_mode)):
        raise MediaError(f"cannot write {path}: it exists and is not a regular file (a folder, a device, a pipe "
                         "or a broken link); choose another name")
    return path


class Mp4Writer:
    """Streams uint8 RGB frames (T, H, W, 3) into an H.264 mp4, renamed into place on success.

    ``with Mp4Writer(path, fps) as out: out.write(chunk)`` — the file appears under ``path`` only when
    the block ends without an exception.
    """

    def __init__(self, path: str | os.PathLike, fps: int, crf: int = 18):
        self.path = check_writable(path, ".mp4")
        self.fps, self.crf = fps, crf
        self.frames_written = 0
        self._container = self._stream = None
        self._partial = _partial_file(self.path, ".mp4")

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
        with disk_full_as_error(self.path, None):
            for frame in frames:
                for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    self._container.mux(packet)
        self.frames_written += len(frames)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._container is not None:
                with disk_full_as_error(self.path, None):
                    if exc_type is None:
                        for packet in self._stream.encode():
                            self._container.mux(packet)
                    self._container.close()
            if exc_type is None:
                if self.frames_written == 0:
                    raise MediaError(f"no frames were written to {self.path}")
                _publish(self._partial, self.path)
        finally:
            _discard(self._partial)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 24) -> str:
    """Write a whole uint8 (T, H, W, 3) video at once; returns the absolute path."""
    with Mp4Writer(path, fps) as out:
        out.write(frames)
    return out.path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3)."""
    frames = [np.asarray(f.convert("RGB")) for f in _decode_frames(_input_file(path, "video"))]
    if not frames:
        raise MediaError(f"the video {os.fspath(path)!r} has no frames")
    return np.stack(frames)


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
    path = check_writable(path, ".png")
    partial = _partial_file(path, ".png")
    try:
        with disk_full_as_error(path, image.nbytes):
            _pil().fromarray(image).save(partial, format="PNG")
        _publish(partial, path)
    finally:
        _discard(partial)
    return path


def write_text(path: str | os.PathLike, text: str, suffix: str) -> str:
    """Write a text file (a report, a prompt list) atomically, as the videos are; ``path`` must end in ``suffix``.
    Returns the absolute path."""
    path = check_writable(path, suffix)
    partial = _partial_file(path, suffix)
    try:
        with disk_full_as_error(path, len(text.encode())):
            with open(partial, "w", encoding="utf-8") as f:
                f.write(text)
        _publish(partial, path)
    finally:
        _discard(partial)
    return path
