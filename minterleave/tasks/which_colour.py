"""Which-colour: multi-image's which-image question turned round, a question type the bundled model never saw
(the worked LoRA example: README "Teaching the bundled model a new question", tutorials/08_lora.ipynb).

which_image gives a colour and a shape ("Which image has a red square?") and asks where it is. This gives a
shape and asks its colour: "What colour is the square?", over three grid scenes (1-3 shapes each) in which
exactly one shape is of that kind. The other shapes take any colour, the answer's too, so the answer is neither
in the question's text nor in which colours are drawn most: the model has to find the shape and read its colour.

Not in tasks.DOMAINS, so `--domain all` and every sample of the four original domains stay as they were: it is
in tasks.EXTRA, selectable by name, and joins "all" only where --domain-weights names it (which_colour=4).
"""

from .render import COLOURS, SHAPES, draw_items, grid_item

LABEL = "Image"
QTYPES = ("which_colour",)
DEFAULTS = {"num_images": 3}   # images to choose from (shared with multi_image, same default)
QUESTION_FIRST = ("which_colour",)   # as which_image: each image is read with the question in view


def choices(qtype, **_):
    return {"which_colour": COLOURS}[qtype]


def generate(rng, qtype, ans, size, num_images=DEFAULTS["num_images"], **_):
    """(images, question, info): num_images grid scenes of 1-3 shapes each; exactly one shape of the asked kind
    in all of them, in the answer's colour, in a random image; the other shapes are of the other kinds, in any
    colour (the answer's too, so counting colours does not find it)."""
    if qtype not in QTYPES:
        raise ValueError(qtype)
    shape, k = rng.choice(SHAPES), rng.randrange(num_images)
    scenes = []
    for i in range(num_images):
        cells = rng.sample(range(9), rng.randint(1, 3))
        items = [grid_item(rng, size, c, rng.choice([s for s in SHAPES if s != shape])) for c in cells]
        if i == k:
            items[0] = grid_item(rng, size, cells[0], shape, ans)
        rng.shuffle(items)
        scenes.append(items)
    return [draw_items(size, it) for it in scenes], f"What colour is the {shape}?", {"items": scenes, "image": k + 1}
