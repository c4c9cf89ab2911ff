"""The fact banks of the embedded set (:mod:`deltalign.data.embedded`): small hand-written questions with a
natural one-sentence answer and a bare short answer -- capitals, colours, animal sounds, opposites, plurals,
arithmetic, day/month order, basic science. Nothing is downloaded; the order is fixed, so generation is
deterministic."""

from __future__ import annotations

from typing import NamedTuple


class Fact(NamedTuple):
    question: str
    answer: str  # natural one-sentence answer, contains upper- and lowercase letters
    short: str  # the bare answer, e.g. "Paris"
    topic: str


_CAPITALS = ("France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Japan:Tokyo China:Beijing "
             "Russia:Moscow Egypt:Cairo Canada:Ottawa Australia:Canberra Greece:Athens Ireland:Dublin Norway:Oslo "
             "Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Poland:Warsaw Austria:Vienna Hungary:Budapest "
             "Kenya:Nairobi Peru:Lima Argentina:Buenos_Aires Mexico:Mexico_City Thailand:Bangkok "
             "South_Korea:Seoul India:New_Delhi Turkey:Ankara Belgium:Brussels the_Netherlands:Amsterdam "
             "Cuba:Havana Chile:Santiago")
_COLOURS = [("grass", "green"), ("a ripe banana", "yellow"), ("fresh snow", "white"), ("coal", "black"),
            ("a ripe tomato", "red"), ("the sky on a clear day", "blue"), ("a lemon", "yellow"), ("milk", "white"),
            ("a carrot", "orange"), ("a strawberry", "red"), ("milk chocolate", "brown"), ("a crow", "black"),
            ("a pumpkin", "orange"), ("an emerald", "green"), ("a flamingo", "pink"), ("a blueberry", "blue"),
            ("a lime", "green")]
_SOUNDS = ("cow:moo dog:woof cat:meow duck:quack sheep:baa pig:oink owl:hoot horse:neigh lion:roar snake:hiss "
           "bee:buzz frog:croak mouse:squeak donkey:hee-haw")
_OPPOSITES = ("hot:cold big:small up:down fast:slow happy:sad light:dark open:closed tall:short full:empty "
              "early:late wet:dry hard:soft loud:quiet rich:poor strong:weak left:right push:pull thick:thin "
              "clean:dirty first:last")
_PLURALS = ("mouse:mice child:children foot:feet tooth:teeth man:men woman:women goose:geese person:people "
            "box:boxes baby:babies leaf:leaves knife:knives wolf:wolves sheep:sheep city:cities bus:buses "
            "cactus:cacti ox:oxen potato:potatoes half:halves")
_PLUS = [(2, 3), (4, 5), (7, 5), (6, 8), (9, 9), (12, 7), (15, 5), (20, 13), (11, 11), (8, 14)]
_MINUS = [(9, 4), (10, 3), (15, 6), (20, 8), (7, 2), (18, 9), (30, 12), (14, 7), (25, 5), (16, 11)]
_TIMES = [(6, 3), (4, 4), (7, 2), (5, 9), (3, 8), (10, 10), (2, 12), (9, 6), (8, 7), (11, 3)]
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = ("January February March April May June July August September October November December").split()
_SCIENCE = [  # question | natural answer | short answer
    "How many legs does a spider have?|A spider has eight legs.|eight",
    "How many legs does an insect have?|An insect has six legs.|six",
    "What gas do plants take in from the air?|Plants take in carbon dioxide from the air.|carbon dioxide",
    "What gas do humans need to breathe?|Humans need oxygen to breathe.|oxygen",
    "At what temperature does water freeze in Celsius?|Water freezes at zero degrees Celsius.|zero degrees",
    "At what temperature does water boil in Celsius?|Water boils at 100 degrees Celsius.|100 degrees",
    "What is the closest star to Earth?|The closest star to Earth is the Sun.|the Sun",
    "Which planet is known as the Red Planet?|Mars is known as the Red Planet.|Mars",
    "What is the largest planet in our solar system?|The largest planet in our solar system is Jupiter.|Jupiter",
    "What force pulls objects toward the ground?|Gravity pulls objects toward the ground.|gravity",
    "What is frozen water called?|Frozen water is called ice.|ice",
    "How many days are in a week?|A week has seven days.|seven",
    "How many months are in a year?|A year has twelve months.|twelve",
    "How many hours are in a day?|A day has twenty-four hours.|twenty-four",
    "How many minutes are in an hour?|An hour has sixty minutes.|sixty",
    "What organ pumps blood around the body?|The heart pumps blood around the body.|the heart",
    "What do bees make?|Bees make honey.|honey",
    "What is the chemical formula for water?|The chemical formula for water is H2O.|H2O",
    "What planet do we live on?|We live on planet Earth.|Earth",
    "Which season comes after winter?|Spring comes after winter.|spring",
    "How many sides does a triangle have?|A triangle has three sides.|three",
    "How many sides does a square have?|A square has four sides.|four",
    "What is the largest ocean on Earth?|The Pacific is the largest ocean on Earth.|the Pacific",
    "What do caterpillars turn into?|Caterpillars turn into butterflies.|butterflies",
    "What part of a plant takes in water from the soil?|The roots take in water from the soil.|the roots",
    "How many continents are there?|There are seven continents.|seven",
]


def _pairs(bank: str) -> list[tuple[str, str]]:
    return [tuple(x.replace("_", " ") for x in item.split(":")) for item in bank.split()]


def capitalise(s: str) -> str:
    """``s`` with its first letter in upper case (the rest unchanged)."""
    return s[:1].upper() + s[1:]


def facts() -> list[Fact]:
    """All facts, in a fixed order (197 of them)."""
    out = [Fact(f"What is the capital of {c}?", f"The capital of {c} is {city}.", city, "geography")
           for c, city in _pairs(_CAPITALS)]
    out += [Fact(f"What colour is {t}?", f"{capitalise(t)} is {col}.", col, "colours") for t, col in _COLOURS]
    out += [Fact(f"What sound does a {a} make?", f"A {a} says {s}.", s, "animals") for a, s in _pairs(_SOUNDS)]
    out += [Fact(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.", b, "words")
            for a, b in _pairs(_OPPOSITES)]
    out += [Fact(f"What is the plural of {a}?", f"The plural of {a} is {b}.", b, "words") for a, b in _pairs(_PLURALS)]
    out += [Fact(f"What is {a} plus {b}?", f"The sum of {a} and {b} is {a + b}.", str(a + b), "maths") for a, b in _PLUS]
    out += [Fact(f"What is {a} minus {b}?", f"The difference between {a} and {b} is {a - b}.", str(a - b), "maths")
            for a, b in _MINUS]
    out += [Fact(f"What is {a} times {b}?", f"The product of {a} and {b} is {a * b}.", str(a * b), "maths")
            for a, b in _TIMES]
    for unit, names in (("day", _DAYS), ("month", _MONTHS)):
        for i, x in enumerate(names):
            nxt, prev = names[(i + 1) % len(names)], names[i - 1]
            out.append(Fact(f"What {unit} comes after {x}?", f"The {unit} after {x} is {nxt}.", nxt, "calendar"))
            out.append(Fact(f"What {unit} comes before {x}?", f"The {unit} before {x} is {prev}.", prev, "calendar"))
    out += [Fact(q, a, s, "science") for q, a, s in (line.split("|") for line in _SCIENCE)]
    return out
