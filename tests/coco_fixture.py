"""A miniature MS-COCO 2014 for the tests: small JPEGs, COCO captions, Karpathy's split, zips,
and a real HTTP server on 127.0.0.1 that serves them (with Range, dropped connections, 416)."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle")


def image_name(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def draw(image_id: int, size: int = 72) -> tuple[Image.Image, str, str]:
    """A noisy background with one coloured square or circle; returns (image, colour, shape)."""
    rng = np.random.default_rng(image_id)
    colour = list(COLOURS)[image_id % len(COLOURS)]
    shape = SHAPES[(image_id // len(COLOURS)) % len(SHAPES)]
    pixels = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
    pen = ImageDraw.Draw(image)
    (pen.rectangle if shape == "square" else pen.ellipse)(box, fill=COLOURS[colour])
    return image, colour, shape


# The instance annotations call the drawn square a kite and the disc a sports ball (two COCO categories).
CATEGORIES = {"square": {"id": 38, "name": "kite", "supercategory": "sports"},
              "circle": {"id": 37, "name": "sports ball", "supercategory": "sports"}}


def instances_for(image_id: int, shape: str, size: int = 72) -> dict:
    """The COCO instance annotation of the one drawn object: its box [x, y, w, h] in pixels."""
    return {"id": image_id, "image_id": image_id, "category_id": CATEGORIES[shape]["id"], "iscrowd": 0,
            "bbox": [size // 4, size // 4, size // 2, size // 2], "area": (size // 2) ** 2}


def captions_for(colour: str, shape: str) -> list[str]:
    return [f"A {colour} {shape} on a grey background.", f"a {colour} {shape}",
            f"There is one {colour} {shape} in the middle", f"The {shape} is {colour}."]


@dataclass
class MiniCoco:
    """Where the pieces of the miniature COCO are, and which ids play which role."""

    root: Path
    train_ids: list[int]
    val_ids: list[int]
    karpathy: dict[str, list[int]]
    missing_id: int            # named by Karpathy's file, not on disk
    truncated_id: int          # a JPEG cut short
    zips: dict[str, bytes] = field(default_factory=dict)


def build_mini_coco(root: Path, n_train: int = 12, n_val: int = 16) -> MiniCoco:
    """Write train2014/, val2014/, annotations/ and karpathy/ under ``root`` and zip each one."""
    train_ids = list(range(1, n_train + 1))
    val_ids = list(range(1001, 1001 + n_val))
    captions: dict[str, dict] = {}
    instances: dict[str, list] = {}
    for split, ids in (("train2014", train_ids), ("val2014", val_ids)):
        folder = root / split
        folder.mkdir(parents=True)
        images, anns, instances[split] = [], [], []
        for image_id in ids:
            image, colour, shape = draw(image_id)
            image.save(folder / image_name(split, image_id), quality=90)
            images.append({"id": image_id, "file_name": image_name(split, image_id), "width": 72, "height": 72})
            anns += [{"id": image_id * 10 + k, "image_id": image_id, "caption": c}
                     for k, c in enumerate(captions_for(colour, shape))]
            instances[split].append(instances_for(image_id, shape))
        captions[split] = {"info": {}, "images": images, "annotations": anns}
    # Awkward but readable files: CMYK, a PNG under a .jpg name, and a truncated JPEG.
    cmyk, png, truncated = train_ids[0], train_ids[1], train_ids[2]
    draw(cmyk)[0].convert("CMYK").save(root / "train2014" / image_name("train2014", cmyk), quality=90)
    draw(png)[0].save(root / "train2014" / image_name("train2014", png), format="PNG")
    path = root / "train2014" / image_name("train2014", truncated)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])  # header intact, data cut
    (root / "annotations").mkdir()
    for split, data in captions.items():
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"info": {}, "images": data["images"], "annotations": instances[split],
             "categories": sorted(CATEGORIES.values(), key=lambda c: c["id"])}))
    karpathy, missing = _karpathy(root, captions, train_ids, val_ids)
    for dataset in FLICKR_FOLDERS:
        (root / "karpathy" / f"dataset_{dataset}.json").write_text(json.dumps(karpathy_flickr(dataset)))
    mini = MiniCoco(root, train_ids, val_ids, karpathy, missing, truncated)
    mini.zips = {"train2014.zip": _zip(root, "train2014"), "val2014.zip": _zip(root, "val2014"),
                 "annotations_trainval2014.zip": _zip(root, "annotations"),
                 "caption_datasets.zip": _zip(root / "karpathy", ".", extra={"readme.txt": b"not extracted"})}
    return mini


# Where the images of each Flickr set are once the user has unpacked them (see README.md).
FLICKR_FOLDERS = {"flickr8k": "Flicker8k_Dataset", "flickr30k": "flickr30k-images"}


def flickr_name(dataset: str, imgid: int) -> str:
    """File names as the sets use them: Flickr8k "2513260012_03d33305cf.jpg", Flickr30k "1000092795.jpg"."""
    return f"{2513260012 + 7 * imgid}_{imgid:010x}.jpg" if dataset == "flickr8k" else f"{1000092795 + imgid}.jpg"


def karpathy_flickr(dataset: str, n_train: int = 12, n_val: int = 4, n_test: int = 4) -> dict:
    """Karpathy's Flickr8k/30k format exactly: "imgid" a running index from 0, "filename", "sentids",
    "sentences" [{"tokens", "raw", "imgid", "sentid"}] (five, raw with capitals and " ." endings),
    "split" train/val/test; no "filepath", no "cocoid"."""
    images, sentid = [], 0
    for imgid in range(n_train + n_val + n_test):
        _, colour, shape = draw(imgid)
        raws = [*captions_for(colour, shape), f"A {colour} {shape} sits in the middle ."]
        sentences = [{"tokens": r.lower().rstrip(" .").split(), "raw": r, "imgid": imgid, "sentid": sentid + k}
                     for k, r in enumerate(raws)]
        split = "train" if imgid < n_train else "val" if imgid < n_train + n_val else "test"
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                       "split": split, "filename": flickr_name(dataset, imgid)})
        sentid += len(sentences)
    return {"images": images, "dataset": dataset}


def write_flickr_images(folder: Path, split_file: Path) -> list[int]:
    """Draw every image a Karpathy Flickr split file names into ``folder``; returns the test imgids."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = json.loads(Path(split_file).read_text())["images"]
    for entry in entries:
        draw(entry["imgid"])[0].save(folder / entry["filename"], quality=90)
    return [e["imgid"] for e in entries if e["split"] == "test"]


def _karpathy(root: Path, captions: dict, train_ids: list[int], val_ids: list[int]):
    """Karpathy's format: val2014 images split into val/test/restval; one entry not on disk."""
    split_of = {i: "train" for i in train_ids}
    split_of.update({i: "val" for i in val_ids[:4]})
    split_of.update({i: "test" for i in val_ids[4:8]})
    split_of.update({i: "restval" for i in val_ids[8:]})
    missing = val_ids[-1] + 1
    entries = []
    for folder, data in captions.items():
        by_image: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        for img in data["images"]:
            entries.append({"cocoid": img["id"], "filepath": folder, "filename": img["file_name"],
                            "split": split_of[img["id"]],
                            "sentences": [{"raw": c, "tokens": c.lower().split()} for c in by_image[img["id"]]]})
    entries.append({"cocoid": missing, "filepath": "val2014", "filename": image_name("val2014", missing),
                    "split": "test", "sentences": [{"raw": "a red square"}]})
    (root / "karpathy").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    groups = {s: [i for i, t in split_of.items() if t in ((s, "restval") if s == "train" else (s,))]
              for s in ("train", "val", "test")}
    return groups, missing


def _zip(root: Path, folder: str, extra: dict[str, bytes] | None = None) -> bytes:
    """Zip ``root/folder`` with member names ``folder/...`` (as the COCO archives do)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        base = root / folder
        for path in sorted(base.rglob("*")):
            if path.is_file():
                name = path.relative_to(root) if folder != "." else path.relative_to(base)
                zf.write(path, str(name))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buffer.getvalue()


def corrupt(data: bytes) -> bytes:
    """Flip bytes inside the first member's compressed data: the zip opens, the CRC check fails."""
    damaged = bytearray(data)
    for k in range(200, 260):
        damaged[k] ^= 0xFF
    return bytes(damaged)


class ZipServer:
    """Serves ``files`` on 127.0.0.1 with HTTP Range; logs every request as (path, Range header).

    ``drop_first``: names whose first response sends half the bytes, then closes the connection.
    ``ignore_range``: answer every request with 200 and the whole file.
    ``no_length``: send no Content-Length; the body ends when the connection closes (HTTP/1.0).
    ``throttle``: seconds to wait before each 16 KiB of a body (a slow link, for kills mid-transfer).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_first: set[str] = set()
        self.ignore_range = False
        self.no_length = False
        self.throttle = 0.0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def requested(self, name: str) -> list[str | None]:
        """The Range headers of the requests for ``name``, in order (None: no Range)."""
        return [r for path, r in self.requests if path == f"/{name}"]

    def __enter__(self) -> "ZipServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: ZipServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            server.requests.append((self.path, self.headers.get("Range")))
            data = server.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            ranged = self.headers.get("Range")
            if ranged and not server.ignore_range:
                start = int(ranged.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            if not server.no_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in server.drop_first:
                server.drop_first.discard(name)
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self._send(body)

        def _send(self, body: bytes) -> None:
            if not server.throttle:
                self.wfile.write(body)
                return
            try:
                for k in range(0, len(body), 1 << 14):
                    time.sleep(server.throttle)
                    self.wfile.write(body[k: k + (1 << 14)])
            except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-transfer
                self.close_connection = True

    return Handler
