"""ppocr-det and ppocr-rec: the real PP-OCRv4 ONNX files shipped in rapidocr-onnxruntime."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from winnow.errors import SourceError
from winnow.models_zoo import data
from winnow.models_zoo.base import Feeds, OnnxZooModel, Outputs, first

SEED = 7
DET_SIZE = (320, 480)  # height, width: multiples of 32
DET_PAGES, DET_BATCH, DET_LINES = 8, 2, 5
REC_SHAPE = (48, 320)  # height, width
REC_LINES, REC_BATCH = 48, 8
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")


def package_folder() -> Path:
    """The installed rapidocr_onnxruntime folder (found without importing the package)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("zoo:ppocr-* needs the package rapidocr-onnxruntime; install it with "
                          "'pip install --no-deps rapidocr-onnxruntime'.")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def config() -> dict:
    """The package's config.yaml (normalization and shapes PP-OCR expects)."""
    import yaml

    return yaml.safe_load((package_folder() / "config.yaml").read_text())


def model_path(part: str) -> Path:
    """Path of the Det or Rec ONNX file named in the package config."""
    return package_folder() / config()[part]["model_path"]


def _font(index: int, size: int):
    """A DejaVu font shipped with matplotlib (the same on every machine)."""
    import matplotlib
    from PIL import ImageFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return ImageFont.truetype(str(folder / FONTS[index % len(FONTS)]), size)


def _paper(rng: np.random.Generator, size: tuple[int, int]):
    """A light, slightly noisy background (RGB PIL image of size (width, height))."""
    from PIL import Image

    base = rng.integers(200, 256, 3)
    noise = rng.normal(0, 6, (size[1], size[0], 1))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _ink(rng: np.random.Generator) -> tuple[int, int, int]:
    """A dark text colour."""
    return tuple(int(c) for c in rng.integers(0, 70, 3))


def _normalize(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB PIL image -> BGR float32 CHW, (x/255 - mean) / std."""
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1] / 255.0
    return ((bgr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def _lines(split: str, count: int, max_chars: int) -> list[str]:
    """`count` real sentence fragments of a split, each at most `max_chars` characters."""
    out = []
    for sentence, _ in data.sentence_split(split, 256, 256):
        words, line = sentence.split(), ""
        for word in words:
            if len(line) + len(word) + 1 > max_chars:
                break
            line = f"{line} {word}".strip()
        out.append(line)
        if len(out) == count:
            break
    return out


def render_page(lines: Sequence[str], rng: np.random.Generator):
    """A page-like RGB image of DET_SIZE with several text lines at varied places and fonts."""
    from PIL import ImageDraw

    height, width = DET_SIZE
    page = _paper(rng, (width, height))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(8, 30))
    for i, line in enumerate(lines):
        size = int(rng.integers(16, 26))
        draw.text((int(rng.integers(6, 40)), y), line, fill=_ink(rng), font=_font(i, size))
        y += size + int(rng.integers(12, 30))
    return page


def render_line(text: str, index: int, rng: np.random.Generator):
    """One text line rendered tightly, resized to height 48 and padded to width 320 (RGB)."""
    from PIL import Image, ImageDraw

    font = _font(index, int(rng.integers(26, 34)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(4, 10))
    image = _paper(rng, (right - left + 2 * pad, bottom - top + 2 * pad))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=_ink(rng), font=font)
    height, width = REC_SHAPE
    new_width = min(width, max(1, round(image.width * height / image.height)))
    return image.resize((new_width, height), Image.BILINEAR)


def ctc_decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC: argmax per frame, collapse repeats, drop blanks (index 0)."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        out.append(tuple(int(i) for i in row[keep]))
    return out


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class PPOCRDet(OnnxZooModel):
    """PP-OCRv4 text detector; metric: fidelity of the probability map to the original."""

    kind = "ocr-det"
    metric_name = "mask_iou"
    output_kind = "map"
    description = "PP-OCRv4 det (real, foreign ONNX), rendered text pages"

    def __init__(self) -> None:
        super().__init__("ppocr-det", model_path("Det"))

    def make_split(self, split: str) -> list[Feeds]:
        """Batches of rendered pages, normalized as the package config says."""
        rng = np.random.default_rng(SEED + (split == "heldout"))
        lines = _lines(split, DET_PAGES * DET_LINES, 44)
        cfg = config()["Det"]
        pages = [_normalize(render_page(lines[i:i + DET_LINES], rng), cfg["mean"], cfg["std"])
                 for i in range(0, len(lines), DET_LINES)]
        return [{"x": np.stack(pages[i:i + DET_BATCH])} for i in range(0, len(pages), DET_BATCH)]

    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """IoU of maps thresholded at the package's threshold, and mean abs difference."""
        ref = np.concatenate([first(o) for o in self.reference_outputs(split)])
        cand = np.concatenate([first(o) for o in outputs])
        thresh = config()["Det"]["thresh"]
        a, b = ref > thresh, cand > thresh
        union = np.logical_or(a, b).sum()
        iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
        return {"mask_iou": iou, "prob_mae": float(np.abs(ref - cand).mean()),
                "text_fraction": float(b.mean())}


class PPOCRRec(OnnxZooModel):
    """PP-OCRv4 text recognizer; metric: agreement of greedy CTC sequences with the original."""

    kind = "ocr-rec"
    metric_name = "seq_agreement"
    output_kind = "probs"
    description = "PP-OCRv4 rec (real, foreign ONNX), rendered text lines"

    def __init__(self) -> None:
        super().__init__("ppocr-rec", model_path("Rec"))

    @functools.cached_property
    def characters(self) -> list[str]:
        """The CTC alphabet: blank, the dictionary stored in the model, then space."""
        import onnx

        proto = onnx.load(str(self.path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        return ["<blank>", *meta["character"].splitlines(), " "]

    def texts(self, split: str) -> list[str]:
        """The ground-truth text of each rendered line of a split."""
        return _lines(split, REC_LINES, 34)

    def make_split(self, split: str) -> list[Feeds]:
        """Batches of rendered lines: BGR, (x/255 - 0.5)/0.5, height 48, right-padded to 320."""
        rng = np.random.default_rng(SEED + 10 + (split == "heldout"))
        images = []
        for i, text in enumerate(self.texts(split)):
            line = _normalize(render_line(text, i, rng), [0.5] * 3, [0.5] * 3)
            padded = np.zeros((3, *REC_SHAPE), np.float32)
            padded[:, :, :line.shape[2]] = line
            images.append(padded)
        return [{"x": np.stack(images[i:i + REC_BATCH])} for i in range(0, len(images), REC_BATCH)]

    def decode(self, probs: np.ndarray) -> list[str]:
        """Greedy CTC decoding to text."""
        chars = self.characters
        return ["".join(chars[i] if i < len(chars) else "?" for i in seq)
                for seq in ctc_decode(probs)]

    def compute_metric(self, outputs: Sequence[Outputs], split: str) -> dict[str, float]:
        """Sequence and frame agreement with the original, and character accuracy vs the text."""
        ref = np.concatenate([first(o) for o in self.reference_outputs(split)])
        cand = np.concatenate([first(o) for o in outputs])
        same = [a == b for a, b in zip(ctc_decode(ref), ctc_decode(cand))]
        truth = self.texts(split)
        errors = sum(_edit_distance(t, p) for t, p in zip(truth, self.decode(cand)))
        return {"seq_agreement": float(np.mean(same)),
                "frame_agreement": float(np.mean(ref.argmax(-1) == cand.argmax(-1))),
                "char_accuracy": 1.0 - errors / max(1, sum(len(t) for t in truth))}


def models() -> list[OnnxZooModel]:
    """The PP-OCR zoo entries."""
    return [PPOCRDet(), PPOCRRec()]
