"""Tests for the built-in shapes world: determinism, geometry, captions, files and reuse."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from attncap.data import shapes
from attncap.data.shapes import COLOURS, Mention, generate_shapes_world, load_objects, named_objects
from attncap.errors import AttncapError
from attncap.files import read_json

SIZE = 128
N_TRAIN, N_VAL, N_TEST = 8, 2, 2


def _generate(root, seed=0, workers=1):
    return generate_shapes_world(root, n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, image_size=SIZE,
                                 seed=seed, workers=workers, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("world"))


def _captions_by_image(world):
    coco = read_json(world.captions_json)
    out = {}
    for annotation in coco["annotations"]:
        out.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return out


def _image_bytes(world):
    return {p.name: p.read_bytes() for p in sorted(world.images_dir.glob("*.jpg"))}


def test_same_seed_is_identical_across_worker_counts_and_other_seed_differs(world, tmp_path):
    parallel = _generate(tmp_path / "parallel", seed=0, workers=2)
    assert _image_bytes(parallel) == _image_bytes(world)
    assert _captions_by_image(parallel) == _captions_by_image(world)
    assert parallel.objects_json.read_bytes() == world.objects_json.read_bytes()
    other = _generate(tmp_path / "other", seed=1)
    assert _image_bytes(other) != _image_bytes(world)
    assert _captions_by_image(other) != _captions_by_image(world)


def test_objects_inside_image_apart_and_sized(world):
    image_size, objects = load_objects(world.objects_json)
    assert image_size == SIZE and sorted(objects) == list(range(1, 13))
    for objs in objects.values():
        assert 1 <= len(objs) <= 4
        for obj in objs:
            x, y, w, h = obj["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE
            assert obj["shape"] in shapes.SHAPES and obj["colour"] in COLOURS and obj["size"] in shapes.SIZES
            low, high = (0.16, 0.21) if obj["size"] == "small" else (0.29, 0.37)
            assert low * SIZE <= w == h <= high * SIZE
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                gap_x = max(b["bbox"][0] - (a["bbox"][0] + a["bbox"][2]), a["bbox"][0] - (b["bbox"][0] + b["bbox"][2]))
                gap_y = max(b["bbox"][1] - (a["bbox"][1] + a["bbox"][3]), a["bbox"][1] - (b["bbox"][1] + b["bbox"][3]))
                assert max(gap_x, gap_y) >= 4


def test_images_are_rgb_jpegs_with_objects_drawn_in_their_colour(world):
    _, objects = load_objects(world.objects_json)
    palette = {name: np.array(rgb, dtype=float) for name, rgb in COLOURS.items()}
    for image_id, objs in objects.items():
        path = world.images_dir / shapes.image_file_name(image_id)
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image, dtype=float)
        for obj in objs:
            x, y, w, h = obj["bbox"]
            cx, cy = x + w // 2, y + h // 2
            mean = pixels[cy - 2:cy + 3, cx - 2:cx + 3].reshape(-1, 3).mean(axis=0)  # centre is inside every shape
            nearest = min(palette, key=lambda name: np.linalg.norm(palette[name] - mean))
            assert nearest == obj["colour"], (image_id, obj, mean)


def _counted(tokens):
    """Multiset of (colour, shape) named by a caption, reading "two/three/four" before a phrase."""
    counts = Counter()
    for m in named_objects(tokens):
        before = m.colour_index - 1
        if before >= 0 and tokens[before] in shapes.SIZE_WORDS["small"] + shapes.SIZE_WORDS["large"]:
            before -= 1
        word = tokens[before] if before >= 0 else ""
        counts[(m.colour, m.shape)] += shapes.NUMBER_WORDS.index(word) + 1 if word in shapes.NUMBER_WORDS else 1
    return counts


def test_every_caption_names_every_object_exactly(world):
    _, objects = load_objects(world.objects_json)
    captions = _captions_by_image(world)
    for image_id, objs in objects.items():
        expected = Counter((o["colour"], o["shape"]) for o in objs)
        assert len(captions[image_id]) == 5 and len(set(captions[image_id])) == 5
        for caption in captions[image_id]:
            assert caption == caption.lower() and all(w.isalpha() for w in caption.split())
            assert _counted(caption.split()) == expected, caption


def test_coco_json_splits_and_manifest(world):
    coco = read_json(world.captions_json)
    assert set(coco) >= {"info", "licenses", "images", "annotations"}
    assert [im["id"] for im in coco["images"]] == list(range(1, 13))
    for im in coco["images"]:
        assert (world.images_dir / im["file_name"]).is_file() and im["width"] == im["height"] == SIZE
    ids = [a["id"] for a in coco["annotations"]]
    assert len(ids) == len(set(ids)) == 60
    assert set(Counter(a["image_id"] for a in coco["annotations"]).values()) == {5}
    splits = read_json(world.splits_json)
    assert splits == {"train": list(range(1, 9)), "val": [9, 10], "test": [11, 12]}
    manifest = read_json(world.root / "manifest.json")
    assert manifest["params"] == {"n_train": 8, "n_val": 2, "n_test": 2, "image_size": SIZE, "seed": 0}


def test_reuse_rewrites_nothing_but_new_parameters_or_lost_manifest_regenerate(tmp_path):
    first = _generate(tmp_path)
    files = [first.captions_json, first.objects_json, first.root / "manifest.json",
             first.images_dir / shapes.image_file_name(1)]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert _generate(tmp_path) == first
    assert [f.stat().st_mtime_ns for f in files] == stamps
    _generate(tmp_path, seed=3)
    assert read_json(first.root / "manifest.json")["params"]["seed"] == 3
    assert first.captions_json.stat().st_mtime_ns != stamps[0]
    stamps = [f.stat().st_mtime_ns for f in files[:2]]
    (first.root / "manifest.json").unlink()  # as after an interrupted run
    _generate(tmp_path, seed=3)
    assert [f.stat().st_mtime_ns for f in files[:2]] != stamps


def test_bad_parameters_raise(tmp_path):
    with pytest.raises(AttncapError, match="image_size"):
        generate_shapes_world(tmp_path, n_train=2, n_val=0, n_test=0, image_size=32, progress=False)
    with pytest.raises(AttncapError, match="at least one image"):
        generate_shapes_world(tmp_path, n_train=0, n_val=0, n_test=0, progress=False)


def test_named_objects_parses_phrases():
    tokens = "a big red circle to the left of two green triangles".split()
    assert named_objects(tokens) == [Mention("red", "circle", 2, 3), Mention("green", "triangle", 9, 10)]
    assert named_objects("red small disks".split()) == [Mention("red", "circle", 0, 2)]
    assert named_objects("a red and a blue box".split()) == [Mention("blue", "square", 4, 5)]
    assert named_objects("red big tiny square".split()) == []  # two size words in between
    assert named_objects("a red".split()) == [] and named_objects([]) == []


def test_vocabulary_is_small_and_parser_words_are_consistent(world):
    vocab = {w for caps in _captions_by_image(world).values() for c in caps for w in c.split()}
    assert len(vocab) < 90
    assert set(shapes.SHAPE_WORDS.values()) == set(shapes.SHAPES)
    assert shapes.SHAPE_WORDS["boxes"] == "square" and shapes.SHAPE_WORDS["disks"] == "circle"
    assert set(shapes.COLOUR_WORDS) == set(COLOURS) and len(COLOURS) == 6
