"""The demo's embedded dataset: rendered shape scenes with a clean caption and a noisy raw text.

Every image shows one object: a colour (8) x a shape (6), drawn small or large, at a random place
and angle, on a white, black or grey background with pixel noise. Each training image gets:

- a *caption* in the role of the synthetic caption: always right, but generic the way
  captioning models are. It names the colour and the shape, never the size or the background;
- a *raw text* in the role of the web text: when clean, it carries every detail (size, colour,
  shape, background) in web-like wording, sometimes with hashtags or a file name around it. With
  probability `noise_rate` it is replaced by one of five kinds of noise, in equal shares:
  another sample's text (`swap`), one wrong attribute (`attribute`), hashtags only (`hashtags`),
  a camera file name (`filename`) or an empty string (`empty`).

So the captions teach colour and shape cleanly, the raw text alone carries size and background,
and a model has to learn from the raw text without learning its noise: the situation ALIP is for.

Optionally (`detailed_captions`), a second caption source in the role of a long, detailed
captioner: it names size, colour, shape and background, but in exactly round(hallucination_rate * n)
pairs ONE attribute of it is wrong (uniformly colour, shape, size or background), the way detailed
captions hallucinate. It is drawn from its own random stream, so everything else is generated
exactly as without it; it goes to a second caption sidecar, its flags to the truth file.
The ground-truth noise flag of each pair goes to `train_truth.jsonl`, for evaluation only; the
training path (manifest -> data2rec -> shards -> loader) never reads it.

Held-out clean test sets, drawn with other random numbers:
- `test/shapes/`: an ImageFolder of the 48 colour x shape classes, `classnames.txt` and
  `templates.txt`, for zero-shot classification;
- `test/shapes_retrieval/`: one image for each of the 288 size x colour x shape x background
  combinations, with its full description, as a Karpathy split JSON (unique texts, so R@1 is
  well defined).

Rendering and text making are pure functions of a seeded `random.Random`; `write_dataset` is the
only function that touches the disk. The same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from alip.files import write_json_atomic

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (245, 125, 185),
    "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
}
NOISE_KINDS = ("swap", "attribute", "hashtags", "filename", "empty")
ATTRIBUTES = ("colour", "shape", "size", "background")

# Synthetic-caption wording: generic, colour and shape only (what a captioner gets right).
CAPTION_TEMPLATES = (
    "a {colour} {shape}",
    "a {colour} {shape} in a picture",
    "an image of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
)
# Detailed-caption wording (the optional second source): every attribute, as a long captioner writes.
DETAILED_TEMPLATES = (
    "a {size} {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} in front of a plain {background} background",
    "an image of a {size} {colour} {shape} against a {background} backdrop",
    "a picture showing a {size} {colour} {shape} on a {background} surface",
)
# Web-text wording: every detail, phrased the ways people title their uploads.
RAW_TEMPLATES = (
    "{size} {colour} {shape} on {background}",
    "a {size} {colour} {shape} on a {background} background",
    "my {size} {colour} {shape}, {background} backdrop",
    "{colour} {shape} ({size}) against {background}",
    "photo of a {size} {colour} {shape} on {background}",
)
HASHTAGS = ("#photooftheday", "#instagood", "#art", "#love", "#nofilter", "#design", "#minimal", "#weekend")
FILE_PATTERNS = ("IMG_{n:04d}.JPG", "DSC{n:05d}.jpg", "P{n:07d}.JPG", "image-{n}.png", "DCIM_{n:04d}")
# zero-shot prompts for the colour x shape classes
ZEROSHOT_TEMPLATES = ("a {c}.", "a picture of a {c}.", "an image of a {c}.")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    background: str

    @property
    def class_name(self) -> str:  # the zero-shot class
        return f"{self.colour} {self.shape}"

    def description(self) -> str:  # the full clean description (retrieval texts)
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. The defaults are `make demo`'s."""

    seed: int = 0
    num_train: int = 6000
    num_zeroshot_per_class: int = 10
    noise_rate: float = 0.4
    image_size: int = 64
    # the optional second caption source: detailed captions, some with one hallucinated attribute
    detailed_captions: bool = False
    hallucination_rate: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {self.noise_rate}")
        if not 0.0 <= self.hallucination_rate <= 1.0:
            raise ValueError(f"hallucination_rate must be in [0, 1], got {self.hallucination_rate}")
        if self.num_train < 2 or self.num_zeroshot_per_class < 1:
            raise ValueError("num_train must be >= 2 and num_zeroshot_per_class >= 1")
        if not 32 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [32, 512], got {self.image_size}")

    def record(self) -> dict:
        """The spec as dataset.json and the demo's summary record it. Without detailed captions the
        fields of that option are left out, so a default dataset's files (and their reuse) are the
        same as before the option existed."""
        out = asdict(self)
        if not self.detailed_captions:
            del out["detailed_captions"], out["hallucination_rate"]
        return out


def class_names() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(list(BACKGROUNDS)))


# ---------------------------------------------------------------- images


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [
            ((1.0 if k % 2 == 0 else 0.42) * math.cos(a), (1.0 if k % 2 == 0 else 0.42) * math.sin(a))
            for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))
        ]
    elif shape == "cross":
        w = 0.34
        pts = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """One scene as an RGB image: jittered colours, random place and angle, pixel noise."""
    scale = 4  # draw at 4x and downsample: anti-aliased edges
    big = size * scale
    bg = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in BACKGROUNDS[scene.background])
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    frac = rng.uniform(0.2, 0.26) if scene.size == "small" else rng.uniform(0.34, 0.44)  # radius / side
    r = frac * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    colour = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[scene.colour])
    angle = rng.uniform(-0.25, 0.25)  # small tilts: upright shapes, as people photograph them
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        inner = 0.55 * r
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=bg)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, angle), fill=colour)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 6.0, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------- texts


def caption_text(scene: Scene, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(colour=scene.colour, shape=scene.shape)


def clean_raw_text(scene: Scene, rng: random.Random) -> str:
    """A correct web text: all details, sometimes decorated with hashtags or a file name."""
    text = rng.choice(RAW_TEMPLATES).format(**asdict(scene))
    decoration = rng.random()
    if decoration < 0.25:
        text += " " + " ".join(rng.sample(HASHTAGS, rng.randint(1, 3)))
    elif decoration < 0.35:
        text = f"{text} {rng.choice(FILE_PATTERNS).format(n=rng.randint(1, 9999))}"
    return text


def mentioned_scene(text: str) -> Scene | None:
    """The scene a (raw) text describes, read back by its attribute words; None when one is missing
    (hashtags, file names, empty strings). For analysis only: which attribute a noisy text got wrong."""
    words = text.replace(",", " ").replace("(", " ").replace(")", " ").split()
    found = []
    for vocab in (COLOURS, SHAPES, SIZES, BACKGROUNDS):
        hits = [w for w in words if w in vocab]
        if not hits:
            return None
        found.append(hits[0])
    return Scene(*found)


def wrong_attribute(scene: Scene, rng: random.Random) -> Scene:
    """The scene with exactly one attribute changed to another value."""
    return changed_attribute(scene, rng)[1]


def changed_attribute(scene: Scene, rng: random.Random) -> tuple[str, Scene]:
    """(which attribute, the scene with it changed to another value): one uniform draw of the attribute,
    one of its other values."""
    field = rng.choice(ATTRIBUTES)
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "background": list(BACKGROUNDS)}
    other = rng.choice([v for v in values[field] if v != getattr(scene, field)])
    return field, Scene(**{**asdict(scene), field: other})


def detailed_text(scene: Scene, rng: random.Random) -> str:
    return rng.choice(DETAILED_TEMPLATES).format(**asdict(scene))


def noisy_raw_text(kind: str, scene: Scene, other: Scene, rng: random.Random) -> str:
    """Raw text of noise `kind`; `other` is another sample's scene (for `swap`)."""
    if kind == "swap":
        if other == scene:
            raise ValueError("a swap needs another sample's scene that differs from this one")
        return clean_raw_text(other, rng)
    if kind == "attribute":
        return clean_raw_text(wrong_attribute(scene, rng), rng)
    if kind == "hashtags":
        return " ".join(rng.sample(HASHTAGS, rng.randint(2, 4)))
    if kind == "filename":
        return rng.choice(FILE_PATTERNS).format(n=rng.randint(1, 99999))
    if kind == "empty":
        return ""
    raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")


# ---------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class TrainSample:
    key: str
    scene: Scene
    caption: str
    raw_text: str
    noise: str | None  # None: the raw text is clean


def make_train_samples(spec: DemoSpec) -> list[TrainSample]:
    """The training pairs. Exactly round(noise_rate * n) of them are noisy, kinds in equal shares."""
    rng = random.Random(f"alip-demo-train-{spec.seed}")
    scenes = [random_scene(rng) for _ in range(spec.num_train)]
    num_noisy = round(spec.noise_rate * spec.num_train)
    noisy_idx = rng.sample(range(spec.num_train), num_noisy)
    kinds = {i: NOISE_KINDS[j % len(NOISE_KINDS)] for j, i in enumerate(noisy_idx)}
    samples = []
    for i, scene in enumerate(scenes):
        kind = kinds.get(i)
        if kind is None:
            raw = clean_raw_text(scene, rng)
        else:
            raw = noisy_raw_text(kind, scene, _other_scene(scenes, scene, rng), rng)
        samples.append(TrainSample(f"{i:06d}", scene, caption_text(scene, rng), raw, kind))
    return samples


@dataclass(frozen=True)
class DetailedCaption:
    caption: str
    wrong: str | None  # the hallucinated attribute; None: the caption is faithful


def make_detailed_captions(spec: DemoSpec, samples: list[TrainSample]) -> list[DetailedCaption]:
    """The second caption source, one per training pair: exactly round(hallucination_rate * n) of
    them with one wrong attribute. Its own random stream: the other data does not change with it."""
    rng = random.Random(f"alip-demo-detailed-{spec.seed}")
    wrong = set(rng.sample(range(len(samples)), round(spec.hallucination_rate * len(samples))))
    out = []
    for i, s in enumerate(samples):
        field, said = changed_attribute(s.scene, rng) if i in wrong else (None, s.scene)
        out.append(DetailedCaption(detailed_text(said, rng), field))
    return out


def _other_scene(scenes: list[Scene], scene: Scene, rng: random.Random) -> Scene:
    """Another sample's scene that differs from `scene` (a swap with an identical scene is no noise)."""
    for _ in range(20):
        other = scenes[rng.randrange(len(scenes))]
        if other != scene:
            return other
    return wrong_attribute(scene, rng)  # tiny sets of near-identical scenes


def retrieval_scenes() -> list[Scene]:
    return [Scene(c, s, z, b) for z in SIZES for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


@dataclass
class DemoData:
    """Paths of a generated dataset (what `write_dataset` returns and the demo passes on)."""

    root: Path
    manifest: Path  # train manifest (JSONL: key, image, text)
    captions: Path  # caption sidecar (the synthetic captions)
    detailed_captions: Path  # second caption sidecar (only with DemoSpec.detailed_captions)
    truth: Path  # hidden noise flags, evaluation only
    zeroshot: Path  # ImageFolder + classnames.txt + templates.txt
    retrieval: Path  # Karpathy JSON; images beside it
    info: Path  # what was generated, with counts

    @classmethod
    def at(cls, root: str | Path) -> DemoData:
        root = Path(root)
        return cls(
            root=root,
            manifest=root / "train" / "manifest.jsonl",
            captions=root / "train" / "captions.jsonl",
            detailed_captions=root / "train" / "captions_detailed.jsonl",
            truth=root / "train_truth.jsonl",
            zeroshot=root / "test" / "shapes",
            retrieval=root / "test" / "shapes_retrieval" / "karpathy.json",
            info=root / "dataset.json",
        )


def _write_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def _sidecar_header(name: str) -> dict:
    return {"meta": {"format": "alip-caption-sidecar", "captioner": {"name": name}}}


def _write_train_texts(paths: DemoData, spec: DemoSpec, samples: list[TrainSample]) -> dict:
    """Manifest, caption sidecar(s) and truth file; returns what dataset.json adds for detailed captions."""
    _write_lines(paths.manifest, [{"key": s.key, "image": f"images/{s.key}.jpg", "text": s.raw_text} for s in samples])
    header = _sidecar_header("alip.demo (generated, clean)")
    _write_lines(paths.captions, [header] + [{"key": s.key, "caption": s.caption} for s in samples])
    truth = [{"key": s.key, "noisy": s.noise is not None, "noise": s.noise, **asdict(s.scene)} for s in samples]
    if not spec.detailed_captions:
        _write_lines(paths.truth, truth)
        return {}
    detailed = make_detailed_captions(spec, samples)
    header = _sidecar_header(f"alip.demo (generated, detailed, {spec.hallucination_rate:g} hallucinated)")
    rows = [{"key": s.key, "caption": d.caption} for s, d in zip(samples, detailed, strict=True)]
    _write_lines(paths.detailed_captions, [header] + rows)
    for t, d in zip(truth, detailed, strict=True):
        t.update(detailed_hallucinated=d.wrong is not None, detailed_wrong=d.wrong)
    _write_lines(paths.truth, truth)
    wrong = Counter(d.wrong for d in detailed if d.wrong is not None)
    return {"detailed_hallucinated": sum(wrong.values()), "detailed_wrong": dict(sorted(wrong.items()))}


def write_dataset(root: str | Path, spec: DemoSpec = DemoSpec(), progress: bool = True) -> DemoData:
    """Generate the whole dataset under `root`. Reuses it when `root` already holds this spec's data."""
    paths = DemoData.at(root)
    if paths.info.is_file():
        info = json.loads(paths.info.read_text(encoding="utf-8"))
        if info.get("spec") == spec.record():
            return paths
        raise FileExistsError(
            f"{paths.root} holds a demo dataset made with other settings {info.get('spec')}; "
            "remove it or choose another folder"
        )
    samples = make_train_samples(spec)
    img_rng = random.Random(f"alip-demo-images-{spec.seed}")
    images = paths.root / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for s in tqdm(samples, desc="demo data: train images", unit="img", disable=not progress):
        (images / f"{s.key}.jpg").write_bytes(jpeg(render(s.scene, img_rng, spec.image_size)))
    detailed_info = _write_train_texts(paths, spec, samples)

    test_rng = random.Random(f"alip-demo-test-{spec.seed}")
    names = class_names()
    for ci, name in enumerate(names):
        folder = paths.zeroshot / f"{ci:02d}_{name.replace(' ', '_')}"  # sorted order == class order
        folder.mkdir(parents=True, exist_ok=True)
        colour, shape = name.split(" ")
        for j in range(spec.num_zeroshot_per_class):
            scene = Scene(colour, shape, test_rng.choice(SIZES), test_rng.choice(list(BACKGROUNDS)))
            (folder / f"{j:03d}.jpg").write_bytes(jpeg(render(scene, test_rng, spec.image_size)))
    (paths.zeroshot / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (paths.zeroshot / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n", encoding="utf-8")

    ret_dir = paths.retrieval.parent
    (ret_dir / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, scene in enumerate(retrieval_scenes()):
        name = f"{i:04d}.jpg"
        (ret_dir / "images" / name).write_bytes(jpeg(render(scene, test_rng, spec.image_size)))
        entries.append(
            {"filepath": "images", "filename": name, "split": "test", "sentences": [{"raw": scene.description()}]}
        )
    write_json_atomic(paths.retrieval, {"dataset": "shapes_retrieval", "images": entries})

    kinds = Counter(s.noise for s in samples if s.noise is not None)
    info = {
        "spec": spec.record(),
        "train": len(samples),
        "noisy": sum(kinds.values()),
        "noise_kinds": dict(sorted(kinds.items())),
        "zeroshot_classes": len(names),
        "zeroshot_images": len(names) * spec.num_zeroshot_per_class,
        "retrieval_images": len(entries),
        **detailed_info,
    }
    write_json_atomic(paths.info, info)  # written last: its presence means the dataset is complete
    return paths
