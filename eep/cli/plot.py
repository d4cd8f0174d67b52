"""A dependency-free PNG line plot (zlib + struct), enough for the run timeline.

``plot_timeline`` draws throughput over time, one vertical marker per event, and a colour key in
the top-left corner (red: fault, orange: repair committed, green: rank rejoined). The axes carry
no text; the demo prints the scale next to the file name.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

Color = tuple[int, int, int]
WHITE, GREY, BLUE = (255, 255, 255), (200, 200, 200), (31, 119, 180)
MARKER_COLORS: dict[str, Color] = {"fault": (214, 39, 40), "repair": (255, 127, 14), "rejoin": (44, 160, 44)}


class Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thickness: int = 1) -> None:
        """Bresenham, thickened by stamping a small square."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        r = thickness // 2
        while True:
            for ox in range(-r, r + 1):
                for oy in range(-r, r + 1):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(y0, y1):
            for x in range(x0, x1):
                self.set(x, y, color)

    def save(self, path: str | Path) -> None:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width:3 * (y + 1) * self.width])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
        Path(path).write_bytes(png)


def plot_timeline(path: str | Path, series: list[tuple[float, float]], markers: list[tuple[float, str]], *,
                  width: int = 900, height: int = 320, margin: int = 30) -> tuple[float, float]:
    """Write the plot; returns ``(max time s, max tokens/s)``, the scale of the axes.

    Parameters:
        series: ``[(time s, tokens per s)]``; markers: ``[(time s, kind)]`` with kind in ``MARKER_COLORS``.
    """
    canvas = Canvas(width, height)
    t_max = max([t for t, _ in series] + [t for t, _ in markers] + [1e-9])
    y_max = max([v for _, v in series] + [1e-9]) * 1.1
    x_of = lambda t: margin + int((width - 2 * margin) * t / t_max)  # noqa: E731
    y_of = lambda v: height - margin - int((height - 2 * margin) * v / y_max)  # noqa: E731
    canvas.line(margin, height - margin, width - margin, height - margin, GREY)
    canvas.line(margin, margin, margin, height - margin, GREY)
    for t, kind in markers:
        canvas.line(x_of(t), margin, x_of(t), height - margin, MARKER_COLORS[kind], thickness=2)
    points = [(x_of(t), y_of(v)) for t, v in series]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        canvas.line(x0, y0, x1, y1, BLUE, thickness=2)
    for i, color in enumerate(MARKER_COLORS.values()):  # colour key: fault, repair, rejoin
        canvas.rect(margin + 8 + 16 * i, 8, margin + 20 + 16 * i, 20, color)
    canvas.save(path)
    return t_max, y_max / 1.1
