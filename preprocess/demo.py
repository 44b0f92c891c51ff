"""Synthetic Geo3K-shaped data, so the whole pipeline runs offline.

    geo3k demo-data --out demo_data --train 200 --test 40

writes `demo_data/{train,test}.parquet` (columns `problem`, `answer`, `images`, like chenhegu/geo3k_imgurl),
the diagrams as PNG files in `demo_data/images/`, and `demo_data/pipeline.yaml` pointing at them. The images
column holds URLs: `file://` URLs by default, or `http://127.0.0.1:PORT/...` with `--base-url` when you
serve the folder (`python -m http.server -d demo_data/images PORT`).

Each problem is drawn with Pillow (lines, triangles, circles, labels; 250-650 px like the real diagrams)
and has a correct answer computed from the construction, in Geo3K's answer style ("13", "5 \\sqrt { 3 }").
Generation is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Problem:
    text: str
    answer: str
    image: Image.Image


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw, int, int]:
    w, h = rng.randint(250, 650), rng.randint(250, 500)
    img = Image.new("RGB", (w, h), "white")
    return img, ImageDraw.Draw(img), w, h


def _label(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 18) -> None:
    d.text(xy, text, fill="black", font=_font(size))


def _sqrt_form(n: int) -> str:
    """Simplest radical form of sqrt(n) in Geo3K's spelling: 13, 5 \\sqrt { 3 }."""
    out, inner = 1, n
    for f in range(int(math.isqrt(n)), 1, -1):
        if inner % (f * f) == 0:
            out, inner = out * f, inner // (f * f)
            break
    if inner == 1:
        return str(out)
    return f"\\sqrt {{ {inner} }}" if out == 1 else f"{out} \\sqrt {{ {inner} }}"


def right_triangle(rng: random.Random) -> Problem:
    a, b = rng.randint(3, 15), rng.randint(3, 15)
    img, d, w, h = _canvas(rng)
    s = min((w - 80) / b, (h - 80) / a)
    p0, p1, p2 = (40, h - 40), (40 + b * s, h - 40), (40, h - 40 - a * s)
    d.polygon([p0, p1, p2], outline="black", width=2)
    d.rectangle([p0[0], p0[1] - 12, p0[0] + 12, p0[1]], outline="black")
    _label(d, (p0[0] - 30, (p0[1] + p2[1]) / 2), str(a))
    _label(d, ((p0[0] + p1[0]) / 2, p0[1] + 8), str(b))
    _label(d, ((p1[0] + p2[0]) / 2 + 8, (p1[1] + p2[1]) / 2 - 18), "x")
    return Problem("<image>Find x.", _sqrt_form(a * a + b * b), img)


def triangle_angle(rng: random.Random) -> Problem:
    a1, a2 = rng.randint(25, 85), rng.randint(25, 85)
    img, d, w, h = _canvas(rng)
    base = w - 100
    # place the apex from the two base angles
    t1, t2 = math.radians(a1), math.radians(a2)
    x = base * math.tan(t2) / (math.tan(t1) + math.tan(t2))
    y = x * math.tan(t1)
    scale = min(1.0, (h - 80) / max(y, 1))
    p0, p1 = (50, h - 40), (50 + base, h - 40)
    apex = (50 + x, h - 40 - y * scale)
    d.polygon([p0, p1, apex], outline="black", width=2)
    _label(d, (p0[0] + 20, p0[1] - 24), f"{a1}°")
    _label(d, (p1[0] - 50, p1[1] - 24), f"{a2}°")
    _label(d, (apex[0] - 8, apex[1] + 10), "x°")
    return Problem("<image>Find x.", str(180 - a1 - a2), img)


def circle_arc(rng: random.Random) -> Problem:
    angle = rng.choice(range(20, 170, 2))
    img, d, w, h = _canvas(rng)
    r = min(w, h) / 2 - 40
    c = (w / 2, h / 2)
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], outline="black", width=2)
    a0 = rng.uniform(0, 360)
    pts = [(c[0] + r * math.cos(math.radians(t)), c[1] - r * math.sin(math.radians(t))) for t in (a0, a0 + angle)]
    for p in pts:
        d.line([c, p], fill="black", width=2)
    d.ellipse([c[0] - 3, c[1] - 3, c[0] + 3, c[1] + 3], fill="black")
    _label(d, (c[0] + 6, c[1] + 6), "O")
    _label(d, (pts[0][0] + 4, pts[0][1] - 20), "A")
    _label(d, (pts[1][0] + 4, pts[1][1] - 20), "B")
    mid = math.radians(a0 + angle / 2)
    _label(d, (c[0] + 0.35 * r * math.cos(mid), c[1] - 0.35 * r * math.sin(mid)), f"{angle}°")
    return Problem("<image>In \\odot O, find m \\widehat A B.", str(angle), img)


def rectangle_area(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    img, d, w, h = _canvas(rng)
    s = min((w - 100) / b, (h - 100) / a)
    x0, y0 = 50, 50
    d.rectangle([x0, y0, x0 + b * s, y0 + a * s], outline="black", width=2)
    _label(d, (x0 + b * s / 2, y0 - 26), f"{b} in.")
    _label(d, (x0 + b * s + 8, y0 + a * s / 2), f"{a} in.")
    return Problem("<image>Find the area of the figure.", str(a * b), img)


def parallel_lines(rng: random.Random) -> Problem:
    angle = rng.randint(35, 145)
    img, d, w, h = _canvas(rng)
    y1, y2 = h * 0.3, h * 0.7
    d.line([(20, y1), (w - 20, y1)], fill="black", width=2)
    d.line([(20, y2), (w - 20, y2)], fill="black", width=2)
    dx = (y2 - y1) / math.tan(math.radians(angle))
    xa = w / 2 - dx / 2
    d.line([(xa - 0.4 * dx, y1 - 0.4 * (y2 - y1)), (xa + 1.4 * dx, y2 + 0.4 * (y2 - y1))], fill="black", width=2)
    _label(d, (xa + 10, y1 - 24), f"{angle}°")
    _label(d, (xa + dx - 30, y2 + 6), "x°")
    return Problem("<image>Lines are parallel. Find x.", str(180 - angle), img)


KINDS = [right_triangle, triangle_angle, circle_arc, rectangle_area, parallel_lines]


def make_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [KINDS[i % len(KINDS)](rng) for i in range(n)]


def write_demo_data(out: Path, num_train: int = 200, num_test: int = 40, seed: int = 0, base_url: str | None = None) -> Path:
    """Write the parquet files, images and a pipeline.yaml; returns the pipeline.yaml path."""
    out = out.resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", num_train, seed), ("test", num_test, seed + 1)):
        rows: dict[str, list] = {"problem": [], "answer": [], "images": []}
        for i, p in enumerate(make_problems(n, s)):
            name = f"{split}_{i:06d}.png"
            buf = io.BytesIO()
            p.image.save(buf, format="PNG", optimize=False)
            (out / "images" / name).write_bytes(buf.getvalue())
            url = f"{base_url.rstrip('/')}/{name}" if base_url else (out / "images" / name).as_uri()
            rows["problem"].append(p.text)
            rows["answer"].append(p.answer)
            rows["images"].append([url])
        pq.write_table(pa.table(rows), out / f"{split}.parquet")
    cfg = out / "pipeline.yaml"
    cfg.write_text(
        "# Demo data written by `geo3k demo-data`; everything not set here takes pipeline.yaml's defaults.\n"
        "dataset: geo3k-demo\n"
        "source:\n"
        f"  files: {{train: {out / 'train.parquet'}, test: {out / 'test.parquet'}}}\n"
        "model:\n"
        "  name_or_path: qwen3-vl-2b\n"
    )
    return cfg
