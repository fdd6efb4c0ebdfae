"""CHAIR (Rohrbach et al., EMNLP 2018): how often captions name COCO objects that are not there.

- CHAIRs: share of captions naming at least one object absent from the image;
- CHAIRi: share of named objects that are absent (each category counted once per caption).

An object is "there" when the image's COCO instance annotations hold its category or one of its
reference captions names it. Captions are matched against :data:`OBJECT_WORDS`, a word and phrase
list written for attncap: to extend it, add a singular word or phrase to its category's tuple
(the regular plural is derived by :func:`plural`; list irregular plurals such as "men" yourself).
Deliberately left out as too ambiguous in captions: "orange" (the colour; "oranges" is kept),
"glass" (windows), "baseball"/"football" (the games) and "glove" (winter gloves).
"""

from __future__ import annotations

from .vocab import tokenize

OBJECT_WORDS: dict[str, tuple[str, ...]] = {
    "person": ("person", "people", "persons", "man", "men", "woman", "women", "boy", "girl", "child",
               "children", "kid", "guy", "lady", "gentleman", "gentlemen", "baby", "adult", "teenager",
               "player", "skier", "surfer", "skateboarder", "snowboarder", "rider", "pedestrian",
               "worker", "chef", "crowd"),
    "bicycle": ("bicycle", "bike", "cyclist"), "car": ("car", "taxi", "sedan", "suv"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped"),
    "airplane": ("airplane", "plane", "aeroplane", "jet", "airliner", "aircraft"), "bus": ("bus",),
    "train": ("train", "locomotive", "tram"), "truck": ("truck", "lorry"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"), "stop sign": ("stop sign",),
    "parking meter": ("parking meter",), "bench": ("bench",),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "geese", "parrot", "swan", "pelican", "owl"),
    "cat": ("cat", "kitten", "kitty"), "dog": ("dog", "puppy", "pup"), "horse": ("horse", "pony", "foal"),
    "sheep": ("sheep", "lamb"), "cow": ("cow", "cattle", "bull", "calf", "calves", "ox", "oxen"),
    "elephant": ("elephant",), "bear": ("bear",), "zebra": ("zebra",), "giraffe": ("giraffe",),
    "backpack": ("backpack", "rucksack"), "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "hand bag", "purse"), "tie": ("tie", "necktie"),
    "suitcase": ("suitcase", "luggage", "baggage"), "frisbee": ("frisbee",), "skis": ("ski", "skis"),
    "snowboard": ("snowboard",), "sports ball": ("sports ball", "ball", "soccer ball", "tennis ball"),
    "kite": ("kite",), "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "baseball mitt", "mitt"),
    "skateboard": ("skateboard", "skate board"), "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet"), "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass"), "cup": ("cup", "mug"), "fork": ("fork",),
    "knife": ("knife", "knives"), "spoon": ("spoon",), "bowl": ("bowl",), "banana": ("banana",),
    "apple": ("apple",), "sandwich": ("sandwich",), "orange": ("oranges",), "broccoli": ("broccoli",),
    "carrot": ("carrot",), "hot dog": ("hot dog", "hotdog"), "pizza": ("pizza",),
    "donut": ("donut", "doughnut"), "cake": ("cake", "cupcake"), "chair": ("chair", "stool"),
    "couch": ("couch", "sofa"), "potted plant": ("potted plant", "houseplant", "plant"), "bed": ("bed",),
    "dining table": ("dining table", "table"), "toilet": ("toilet",), "tv": ("tv", "television"),
    "laptop": ("laptop", "computer"), "mouse": ("mouse", "mice"),
    "remote": ("remote", "remote control", "controller"), "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone"),
    "microwave": ("microwave",), "oven": ("oven", "stove"), "toaster": ("toaster",), "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"), "book": ("book",), "clock": ("clock",), "vase": ("vase",),
    "scissors": ("scissors",), "teddy bear": ("teddy bear", "teddy", "stuffed animal", "stuffed bear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"), "toothbrush": ("toothbrush",),
}
# Phrases that contain an object word but name no object (matched first, then skipped) ...
NOT_OBJECTS = ("bus stop", "train station", "train track", "hot dog stand")
# ... and "baby" as a modifier: a baby elephant is an elephant, not a person.
BABY_ANIMALS = ("elephant", "giraffe", "bird", "cow", "zebra", "bear", "sheep", "horse", "cat", "dog")


def plural(phrase: str) -> str:
    """The regular English plural of a phrase's last word: bus -> buses, pony -> ponies, dog -> dogs."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}".strip()


def phrase_table() -> dict[tuple[str, ...], str | None]:
    """Every listed phrase and its plural, as word tuples -> category (None: names no object)."""
    table: dict[tuple[str, ...], str | None] = {}
    for category, phrases in OBJECT_WORDS.items():
        for phrase in phrases:
            table.setdefault(tuple(plural(phrase).split()), category)
            table[tuple(phrase.split())] = category
    for phrase in NOT_OBJECTS:
        for form in (phrase, plural(phrase)):
            table[tuple(form.split())] = None
    for animal in BABY_ANIMALS:
        for form in (animal, plural(animal)):
            table[("baby", form)] = table[(form,)]
    return table


def named_objects(words: list[str], table: dict | None = None) -> list[tuple[int, str, str]]:
    """The COCO objects a caption names: [(index of the phrase's last word, phrase, category)].

    words: the caption's lowercase tokens. Longer phrases win ("hot dog" before "dog", "teddy bear"
    before "bear"); the index points at the phrase's head noun (its last word), for grounding.
    """
    table = table if table is not None else phrase_table()
    longest = max(len(k) for k in table)
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            key = tuple(words[i:i + n])
            if key in table:
                if table[key] is not None:
                    found.append((i + n - 1, " ".join(key), table[key]))
                i += n
                break
        else:
            i += 1
    return found


def ground_truth(instances: dict[int, set[str]], references: dict[int, list[str]]) -> dict[int, set[str]]:
    """Objects present per image: its annotated categories plus those named in its reference captions."""
    table = phrase_table()
    return {i: set(instances.get(i, ())) | {c for ref in refs for _, _, c in named_objects(tokenize(ref), table)}
            for i, refs in references.items()}


def chair_scores(candidates: dict[int, str], truth: dict[int, set[str]]
                 ) -> tuple[dict[str, float], dict[int, list[str]]]:
    """CHAIRs and CHAIRi of captions against the objects present (see :func:`ground_truth`).

    candidates: {image id: caption}; truth: {image id: {category}}. Returns the scores
    {"CHAIRs", "CHAIRi", "chair_captions", "chair_mentions"} (0.0 when nothing is named) and
    {image id: [hallucinated phrases as written, in caption order]}.
    """
    table = phrase_table()
    hallucinated: dict[int, list[str]] = {}
    mentions = wrong = bad_captions = 0
    for image_id, caption in candidates.items():
        seen: dict[str, str] = {}  # category -> first phrase naming it
        for _, phrase, category in named_objects(tokenize(caption), table):
            seen.setdefault(category, phrase)
        absent = [phrase for category, phrase in seen.items() if category not in truth.get(image_id, set())]
        hallucinated[image_id] = absent
        mentions += len(seen)
        wrong += len(absent)
        bad_captions += bool(absent)
    n = len(candidates)
    return ({"CHAIRs": bad_captions / n if n else 0.0, "CHAIRi": wrong / mentions if mentions else 0.0,
             "chair_captions": n, "chair_mentions": mentions}, hallucinated)
