"""Frame codecs for dataset chunks: frames <-> arrays that go into a chunk's .npz.

Image codecs compress each frame on its own (any frame decodes without its neighbours) and
store all of a chunk's frames as one byte array plus offsets:
    frames_data    uint8 (total_bytes,)   encoded frames, back to back
    frames_offsets int64 (N + 1,)         frame i is frames_data[offsets[i]:offsets[i + 1]]
The ``raw`` codec stores ``frames`` uint8 (N, H, W, 3) as is.

Measured bytes per frame and speeds are in episodes/FORMAT.md. ``png`` is the default: lossless,
readable by any image tool, about 1.2 KB per Breakout frame and 33 KB per 320x240 Doom frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Codec:
    """One way of storing frames. ``ext`` is the cv2 image format, None for raw arrays;
    ``magic`` (offset, bytes) is the signature every encoded frame starts with."""

    name: str
    ext: str | None
    params: tuple[int, ...] = ()
    lossless: bool = True
    magic: tuple[int, bytes] = (0, b"")


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        # Level 3: most of level 9's size at a fraction of its encode time (see FORMAT.md).
        Codec("png", ".png", (cv2.IMWRITE_PNG_COMPRESSION, 3), magic=(0, b"\x89PNG")),
        # Quality above 100 selects WebP's lossless mode: ~2.4x smaller than PNG, ~4x slower to write.
        Codec("webp", ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101), magic=(8, b"WEBP")),
        Codec("jpeg", ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95), lossless=False, magic=(0, b"\xff\xd8")),
        Codec("raw", None),
    )
}


def get_codec(name: str) -> Codec:
    """The codec called ``name``; a ValueError lists the known ones."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def encode_frame(frame: np.ndarray, codec: Codec) -> np.ndarray:
    """One RGB frame (H, W, 3) uint8 -> encoded bytes as uint8 (n,) (or the frame itself for raw)."""
    if codec.ext is None:
        return np.ascontiguousarray(frame)
    # cv2 codecs expect BGR; converting keeps the files correct for any image viewer.
    ok, buf = cv2.imencode(codec.ext, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), list(codec.params))
    if not ok:
        raise ValueError(f"{codec.name}: could not encode a frame of shape {frame.shape}")
    return buf.reshape(-1)


def pack_frames(encoded: list[np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
    """Encoded frames of one chunk -> the npz fields that hold them."""
    if codec.ext is None:
        return {"frames": np.stack(encoded)}
    sizes = np.array([len(e) for e in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    data = np.concatenate(encoded) if encoded else np.zeros(0, np.uint8)
    return {"frames_data": data, "frames_offsets": offsets}


def check_frames(fields: dict[str, np.ndarray], codec: Codec) -> int:
    """Cheap check without decoding: offsets consistent and every frame starts with the codec's
    signature. Returns the number of frames; raises ValueError on bad data."""
    if codec.ext is None:
        frames = fields["frames"]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"raw frames have shape {frames.shape}, not (N, H, W, 3)")
        return len(frames)
    data, offsets = fields["frames_data"], fields["frames_offsets"]
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
        raise ValueError("frame offsets do not match the frame data")
    at, magic = codec.magic
    for i in range(len(offsets) - 1):
        start = int(offsets[i]) + at
        if data[start : start + len(magic)].tobytes() != magic:
            raise ValueError(f"frame {i} is not a {codec.name} image")
    return len(offsets) - 1


def unpack_frames(fields: dict[str, np.ndarray], codec: Codec) -> np.ndarray:
    """Npz fields of one chunk -> frames (N, H, W, 3) uint8. Raises ValueError on bad data."""
    if codec.ext is None:
        return np.asarray(fields["frames"], dtype=np.uint8)
    check_frames(fields, codec)
    data, offsets = fields["frames_data"], fields["frames_offsets"]
    frames = []
    for i in range(len(offsets) - 1):
        bgr = cv2.imdecode(data[offsets[i] : offsets[i + 1]], cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"frame {i} does not decode as {codec.name}")
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(frames)
