"""Regenerate textcam/vocab/general.txt: a general visual vocabulary (~5,500 phrases).

Word lists of colours, textures (the 47 DTD categories), materials, shapes, scenes, parts,
artefacts and the 1000 ImageNet categories (from torchvision's offline weight metadata), plus
compositional phrases (colour + texture, colour + material, scene backgrounds). Run:
    python data/vocab/make_general_vocab.py > textcam/vocab/general.txt
"""

from itertools import product


def _words(text: str) -> list[str]:
    """Whitespace-separated words of a block of text."""
    return text.split()


def _lines(text: str) -> list[str]:
    return text.split("\n")


COLOURS = _words("""red orange yellow green blue purple pink brown black white grey gold silver beige
turquoise navy maroon olive teal cyan magenta tan cream dark light""")
TEXTURES = _words("""banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline
dotted fibrous flecked frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined
marbled matted meshed paisley perforated pitted pleated polka-dotted porous potholed scaly smeared
spiralled sprinkled stained stratified striped studded swirly veined waffled woven wrinkled
zigzagged""")
MATERIALS = _words("""wood metal plastic glass stone brick concrete fabric leather fur feathers paper
cardboard rubber ceramic porcelain marble sand water ice snow grass foliage soil mud rust chrome
denim wool silk hair skin""")
SHAPES = _words("""circle square triangle star rectangle oval hexagon diamond cross heart spiral ring
cylinder sphere cube cone pyramid arch curve line""")
SCENES = _lines("""beach ocean lake river waterfall forest jungle meadow field farm desert mountain hill
valley canyon cave glacier snowfield sky clouds sunset night street road highway bridge city
skyscraper building house kitchen bathroom bedroom living room office classroom library shop
supermarket restaurant bar stadium playground park garden lawn swimming pool aquarium zoo
laboratory hospital church temple castle harbor dock airport runway train station parking lot
garage factory warehouse construction site market stage studio underwater coral reef swamp
marsh tundra savanna prairie orchard vineyard greenhouse barn stable tunnel alley sidewalk
courtyard rooftop balcony porch attic basement corridor staircase elevator""")
SCENES = [s for line in SCENES for s in line.split()]  # single words; multiword scenes below
SCENES += [
    "living room",
    "swimming pool",
    "train station",
    "parking lot",
    "construction site",
    "coral reef",
    "snowy mountain",
    "sandy beach",
    "green field",
    "blue sky",
    "night sky",
]
PARTS = _words("""head face eye eyes ear ears nose mouth beak teeth tongue neck body leg legs paw paws
claw claws tail wing wings fin fins feather horn horns antlers mane whiskers shell scales stripes
spots fur coat hand fingers arm foot wheel wheels tire door window roof handle screen keyboard
button lid label logo text letters numbers sign flag rope chain strap blade handle lens
headlight grille petals leaves stem branch trunk roots bark seed fruit flower""")
ARTEFACTS = _lines("""watermark text overlay caption border frame timestamp logo stamp copyright notice
blurry image noise compression artifacts overexposed underexposed dark image bright image
low contrast motion blur vignette black border white border photo frame screenshot drawing
sketch painting cartoon illustration diagram rendering close-up macro shot aerial view
top-down view side view crowd person people child hand holding it""")
ARTEFACTS = [a.strip() for line in ARTEFACTS for a in line.split("  ") if a.strip()]
LIGHTING = _words("""sunlight shadow shade reflection glare backlight silhouette fog mist rain snowfall
smoke fire flames lightning rainbow haze dusk dawn twilight moonlight lamplight neon lights""")


def imagenet_names() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def phrases() -> list[str]:
    out: list[str] = []
    out += COLOURS + TEXTURES + MATERIALS + SHAPES + SCENES + PARTS + ARTEFACTS + LIGHTING
    out += [f"{c} colour" for c in COLOURS]
    out += [f"{t} texture" for t in TEXTURES]
    out += [f"{s} background" for s in SCENES]
    out += [f"{m} background" for m in MATERIALS]
    out += [f"{c} {t}" for c, t in product(COLOURS, TEXTURES)]
    out += [f"{c} {m}" for c, m in product(COLOURS, MATERIALS)]
    out += [f"{c} {s}" for c, s in product(COLOURS, SHAPES)]
    out += [f"{c} {p}" for c, p in product(COLOURS[:12], PARTS)]
    out += [f"{m} {s}" for m, s in product(MATERIALS, SHAPES)]
    out += imagenet_names()
    seen: set[str] = set()
    return [p for p in (x.strip().lower() for x in out) if p and not (p in seen or seen.add(p))]


if __name__ == "__main__":
    print("\n".join(phrases()))
