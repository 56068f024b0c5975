"""Writing the dream to an mp4, with the action of each frame written on it.

The frames are zoomed (nearest) before encoding: a 64x64 frame is too small to read text on, and
mp4 codecs smear tiny frames.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FOURCC = "mp4v"  # MPEG-4 part 2: built into every opencv wheel, no system ffmpeg needed
VIDEO_SIDE = 256  # pixels: frames are zoomed to about this height


class VideoWriter:
    """An mp4 file of uint8 (H, W, 3) RGB frames at ``fps``, each with a caption."""

    def __init__(self, path: str | Path, fps: float, frame_shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        h, w = frame_shape[:2]
        self.zoom = max(1, VIDEO_SIDE // max(h, w))
        self.size = (w * self.zoom, h * self.zoom)  # cv2 wants (width, height)
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*FOURCC), float(fps), self.size)
        if not self._writer.isOpened():
            raise OSError(f"cannot write video {self.path}: check that the folder is writable and the "
                          "name ends in .mp4")
        self.frames = 0

    def write(self, frame: np.ndarray, caption: str = "") -> None:
        big = cv2.resize(frame, self.size, interpolation=cv2.INTER_NEAREST)
        bgr = cv2.cvtColor(big, cv2.COLOR_RGB2BGR)
        if caption:
            scale = 0.4 * self.zoom / 4 + 0.2
            # dark outline under white text: readable on any background
            for color, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
                cv2.putText(bgr, caption, (4, self.size[1] - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, color,
                            thick, cv2.LINE_AA)
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> int:
        """Finish the file; returns the number of frames written."""
        self._writer.release()
        return self.frames
