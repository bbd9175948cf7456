"""Multi-image domain: shapes in the cells of a 3x3 grid, over two or more images. Questions: what changed
between two images, which image has a given colour and shape, how many shapes of a colour in total.
"""

from .render import COLOURS, SHAPES, draw_items, grid_item

LABEL = "Image"
QTYPES = ("spot_diff", "which_image", "count")
DEFAULTS = {"num_images": 3}   # which_image: images to choose from
# Asked before the images: a causal decoder then reads each image token with "a red square" already in
# view and can match it there; asked after, the one answering position must bind colour and shape itself.
QUESTION_FIRST = ("which_image",)


def choices(qtype, num_images=DEFAULTS["num_images"], **_):
    return {"spot_diff": ("added", "removed", "recoloured", "moved"),
            "which_image": tuple(str(i + 1) for i in range(num_images)),
            "count": ("1", "2", "3", "4")}[qtype]


def generate(rng, qtype, ans, size, num_images, **_):
    """(images, question, info): two scenes for spot_diff and count, num_images for which_image."""
    if qtype == "spot_diff":
        n1 = {"added": rng.randint(2, 3), "removed": rng.randint(3, 4)}.get(ans, rng.randint(2, 4))
        cells = rng.sample(range(9), n1 + 1)
        a = [grid_item(rng, size, c) for c in cells[:n1]]
        b = [dict(it) for it in a]
        k = rng.randrange(n1)
        if ans == "added":
            b.insert(rng.randrange(n1 + 1), grid_item(rng, size, cells[n1]))
        elif ans == "removed":
            b.pop(k)
        elif ans == "recoloured":
            b[k]["colour"] = rng.choice([c for c in COLOURS if c != a[k]["colour"]])
        else:  # moved: same shape and colour, another cell
            b[k] = grid_item(rng, size, cells[n1], a[k]["shape"], a[k]["colour"])
        return [draw_items(size, a), draw_items(size, b)], "What changed between the two images?", {"items": [a, b]}
    if qtype == "which_image":
        target = (rng.choice(COLOURS), rng.choice(SHAPES))
        scenes = []
        for i in range(num_images):
            n = rng.randint(1, 3)
            cells = rng.sample(range(9), n)
            items = []
            for j, c in enumerate(cells):
                if i == int(ans) - 1 and j == 0:
                    items.append(grid_item(rng, size, c, target[1], target[0]))
                    continue
                if j == 0 and rng.random() < 0.7:   # a hard negative: same colour or same shape
                    col, shp = (target[0], rng.choice([s for s in SHAPES if s != target[1]])) \
                        if rng.random() < 0.5 else (rng.choice([c2 for c2 in COLOURS if c2 != target[0]]), target[1])
                else:
                    col, shp = rng.choice([(c2, s2) for c2 in COLOURS for s2 in SHAPES if (c2, s2) != target])
                items.append(grid_item(rng, size, c, shp, col))
            rng.shuffle(items)
            scenes.append(items)
        q = f"Which image has a {target[0]} {target[1]}?"
        return [draw_items(size, it) for it in scenes], q, {"items": scenes}
    # count: the number of <colour> shapes over two images
    k, col = int(ans), rng.choice(COLOURS)
    k1 = rng.randint(max(0, k - 4), min(k, 4))
    scenes = []
    for ki in (k1, k - k1):
        t = rng.randint(max(2, ki), 4)
        cols = [col] * ki + [rng.choice([c for c in COLOURS if c != col]) for _ in range(t - ki)]
        rng.shuffle(cols)
        scenes.append([grid_item(rng, size, c, colour=cc) for c, cc in zip(rng.sample(range(9), t), cols)])
    return [draw_items(size, it) for it in scenes], f"How many {col} shapes are there in total?", {"items": scenes}
