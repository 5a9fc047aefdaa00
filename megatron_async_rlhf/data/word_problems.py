"""Synthetic grade-school word problems in the GSM8k format, easy enough for a ~135M instruct model.

Each row has the real GSM8k schema: ``question`` (a short story ending in one question) and ``answer`` (a worked
solution, one line per arithmetic step with a ``<<a*b=c>>c`` calculator annotation, then ``#### <final answer>``).
A problem has 1 to ``max_steps`` steps (+, -, *, exact /); every operand and result is a positive integer below
``MAX_VALUE`` and most drawn numbers are 2..20, so a weak model's greedy accuracy starts well above 0 and RL has
room to improve it. Stories come from many templates (shopping, cooking, school, sports, travel, animals, saving,
hobbies, family) with varied names, items and units.

Every step of a template feeds the next, so the question needs all of them: step 1 alone answers a 1-step problem,
steps 1-2 a 2-step one, and so on. Numbers that break a rule (inexact division, a value out of range) are drawn
again. Generation is deterministic for a seed; questions are unique within one call, so splits cut from one call
are disjoint. Stdlib only.

    rows = make_word_problems(1000, seed=0)          # [{"question": ..., "answer": "...\\n#### 42"}, ...]
    write_gsm8k_jsonl("data/gsm8k_synth", train_size=5000, test_size=500)
    datasets.load_dataset("data/gsm8k_synth", split="test")
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from typing import Callable

MAX_STEPS = 3  # every template tells a story of up to this many steps
MAX_VALUE = 200  # every number in a question or a solution is below this


@dataclass(frozen=True)
class WordProblem:
    question: str
    answer: str  # GSM8k worked solution ending in "#### <value>"
    value: int  # the final answer
    steps: int  # arithmetic steps in the solution
    template: str  # name of the story template that made it

    def row(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


class _Retry(Exception):
    """The drawn numbers break a rule (inexact division, a value out of range): draw the problem again."""


@dataclass(frozen=True)
class _Person:
    name: str
    he: str
    him: str
    his: str

    @property
    def He(self) -> str:  # noqa: N802 (reads like the sentence it writes)
        return self.he.capitalize()

    @property
    def His(self) -> str:  # noqa: N802
        return self.his.capitalize()


_NAMES = {
    "she": ["Maya", "Lily", "Emma", "Sofia", "Ava", "Zoe", "Nora", "Aisha", "Mei", "Priya", "Rosa", "Hannah",
            "Chloe", "Grace", "Amara", "Julia", "Nina", "Olivia", "Sara", "Yuki"],
    "he": ["Tom", "Leo", "Sam", "Ben", "Omar", "Jack", "Carlos", "Ravi", "Noah", "Ethan", "Liam", "Kenji", "Max",
           "Lucas", "Daniel", "Amir", "Felix", "Hugo", "Owen", "Ivan"],
}
_PEOPLE = [_Person(n, "she", "her", "her") for n in _NAMES["she"]] + \
          [_Person(n, "he", "him", "his") for n in _NAMES["he"]]
_TEACHERS = [_Person(n, "she", "her", "her") for n in ("Ms. Garcia", "Mrs. Chen", "Ms. Patel", "Mrs. Brown")] + \
            [_Person(n, "he", "him", "his") for n in ("Mr. Lee", "Mr. Novak", "Mr. Adams", "Mr. Silva")]


class _Story:
    """Collects a template's sentences and solution lines; ``step`` checks each result."""

    def __init__(self, rng: random.Random, steps: int):
        self.rng, self.steps = rng, steps
        self.sentences: list[str] = []
        self.lines: list[str] = []
        self.question = ""
        self.value = 0

    def num(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, seq):
        return self.rng.choice(seq)

    def person(self, *others: _Person, pool: list[_Person] = _PEOPLE) -> _Person:
        while True:
            p = self.rng.choice(pool)
            if all(p.name != o.name for o in others):
                return p

    def divisor(self, value: int, lo: int = 2, hi: int = 10) -> int:
        """A random d in [lo, hi], d < value, that divides value exactly."""
        ds = [d for d in range(lo, min(hi, value - 1) + 1) if value % d == 0]
        if not ds:
            raise _Retry
        return self.rng.choice(ds)

    def check(self, ok: bool) -> None:
        if not ok:
            raise _Retry

    def say(self, sentence: str) -> None:
        self.sentences.append(sentence)

    def step(self, before: str, a: int, op: str, b: int, after: str, money: bool = False) -> int:
        """One solution line ``{before} a op b = <<a op b=v>>v{after}``; returns v."""
        if op == "/":
            self.check(b > 0 and a % b == 0)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        self.check(0 < v < MAX_VALUE and a < MAX_VALUE and b < MAX_VALUE)
        dollar = "$" if money else ""
        self.lines.append(f"{before} {a} {op} {b} = {dollar}<<{a}{op}{b}={v}>>{v}{after}")
        self.value = v
        return v

    def ask(self, question: str) -> None:
        self.question = question


_TEMPLATES: dict[str, tuple[str, Callable[[_Story], None]]] = {}


def _template(domain: str):
    def register(fn):
        _TEMPLATES[fn.__name__] = (domain, fn)
        return fn
    return register


# Each template writes step 1, returns if the problem has 1 step, writes step 2, ... The question asked is the one
# whose answer is the last step written.

@_template("shopping")
def fruit_bags(s: _Story) -> None:
    p = s.person()
    item, box, boxes = s.pick([("apples", "bag", "bags"), ("oranges", "bag", "bags"), ("peaches", "box", "boxes"),
                               ("plums", "basket", "baskets"), ("lemons", "net", "nets"), ("pears", "box", "boxes")])
    a, b = s.num(2, 9), s.num(3, 12)
    s.say(f"{p.name} buys {a} {boxes} of {item} at the market. Each {box} holds {b} {item}.")
    total = s.step(f"{p.He} buys", a, "*", b, f" {item}.")
    if s.steps == 1:
        return s.ask(f"How many {item} does {p.name} buy?")
    c = s.num(2, min(total - 1, 15))
    s.say(f"{p.He} gives {c} {item} to {s.person(p).name}.")
    left = s.step(f"{p.He} has", total, "-", c, f" {item} left.")
    if s.steps == 2:
        return s.ask(f"How many {item} does {p.name} have left?")
    d = s.divisor(left)
    s.say(f"{p.He} puts the rest into {d} bowls, the same number in each bowl.")
    s.step("Each bowl gets", left, "/", d, f" {item}.")
    s.ask(f"How many {item} are in each bowl?")


@_template("shopping")
def school_supplies(s: _Story) -> None:
    p = s.person()
    item, price = s.pick([("notebooks", (2, 6)), ("pens", (1, 4)), ("folders", (2, 5)), ("markers", (2, 4)),
                          ("erasers", (1, 3)), ("rulers", (2, 5))])
    a, b = s.num(2, 8), s.num(*price)
    s.say(f"{p.name} buys {a} {item} that cost ${b} each.")
    spent = s.step(f"The {item} cost", a, "*", b, ".", money=True)
    if s.steps == 1:
        return s.ask(f"How much money does {p.name} spend on {item}?")
    extra, c = s.pick([("a backpack", (10, 25)), ("a lunch box", (5, 12)), ("a calculator", (8, 20))])
    c = s.num(*c)
    s.say(f"{p.He} also buys {extra} for ${c}.")
    total = s.step(f"{p.He} spends", spent, "+", c, " in all.", money=True)
    if s.steps == 2:
        return s.ask(f"How much money does {p.name} spend in all?")
    bill = min(x for x in (20, 50, 100, 150) if x > total) if total < 150 else 0
    s.check(bill > 0)
    s.say(f"{p.He} pays with ${bill}.")
    s.step(f"{p.His} change is", bill, "-", total, ".", money=True)
    s.ask(f"How much change does {p.name} get?")


@_template("cooking")
def fruit_salad(s: _Story) -> None:
    p = s.person()
    a, b = s.num(3, 15), s.num(3, 15)
    s.say(f"{p.name} makes a fruit salad with {a} strawberries and {b} grapes.")
    total = s.step("The salad has", a, "+", b, " pieces of fruit.")
    if s.steps == 1:
        return s.ask("How many pieces of fruit are in the salad?")
    friend = s.person(p)
    c = s.num(2, 12)
    s.say(f"{friend.name} adds {c} blueberries to the salad.")
    total = s.step("Now the salad has", total, "+", c, " pieces of fruit.")
    if s.steps == 2:
        return s.ask("How many pieces of fruit are in the salad now?")
    d = s.divisor(total, 2, 6)
    s.say(f"They split the salad equally into {d} cups.")
    s.step("Each cup gets", total, "/", d, " pieces of fruit.")
    s.ask("How many pieces of fruit are in each cup?")


@_template("cooking")
def pizza_party(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 6), s.pick([4, 6, 8, 10, 12])
    s.say(f"{p.name} orders {a} pizzas for a party. Each pizza is cut into {b} slices.")
    total = s.step("There are", a, "*", b, " slices.")
    if s.steps == 1:
        return s.ask("How many slices of pizza are there?")
    c = s.num(2, min(total - 2, 12))
    s.say(f"At the end of the party, {c} slices are left over.")
    eaten = s.step("The guests ate", total, "-", c, " slices.")
    if s.steps == 2:
        return s.ask("How many slices were eaten?")
    d = s.divisor(eaten, 2, 4)
    s.say(f"Only the guests ate pizza, and every guest ate {d} slices.")
    s.step("There were", eaten, "/", d, " guests.")
    s.ask("How many guests were at the party?")


@_template("cooking")
def lemonade(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 8), s.num(2, 9)
    s.say(f"{p.name} uses {a} lemons to make one pitcher of lemonade. {p.He} makes {b} pitchers.")
    lemons = s.step(f"{p.He} uses", a, "*", b, " lemons.")
    if s.steps == 1:
        return s.ask(f"How many lemons does {p.name} use?")
    d = s.divisor(lemons, 3, 12)
    s.say(f"Lemons are sold in bags of {d}.")
    bags = s.step(f"{p.He} needs", lemons, "/", d, " bags.")
    if s.steps == 2:
        return s.ask(f"How many bags of lemons does {p.name} need?")
    e = s.num(2, 6)
    s.say(f"Each bag costs ${e}.")
    s.step(f"{p.He} pays", bags, "*", e, " for the lemons.", money=True)
    s.ask(f"How much does {p.name} pay for the lemons?")


@_template("school")
def reading_pages(s: _Story) -> None:
    p = s.person()
    a, b = s.num(5, 30), s.num(5, 30)
    s.say(f"{p.name} reads {a} pages of a book on Monday and {b} pages on Tuesday.")
    read = s.step(f"{p.He} reads", a, "+", b, " pages in two days.")
    if s.steps == 1:
        return s.ask(f"How many pages does {p.name} read on Monday and Tuesday together?")
    d, q = s.num(2, 5), s.num(3, 12)
    rest = d * q if s.steps == 3 else s.num(5, 60)
    s.check(read + rest < MAX_VALUE)
    s.say(f"The book has {read + rest} pages.")
    rest = s.step(f"{p.He} still has", read + rest, "-", read, " pages to read.")
    if s.steps == 2:
        return s.ask(f"How many pages does {p.name} still have to read?")
    s.say(f"{p.He} reads the rest in {d} days, the same number of pages each day.")
    s.step(f"{p.He} reads", rest, "/", d, " pages each day.")
    s.ask(f"How many pages does {p.name} read each day?")


@_template("school")
def classroom_groups(s: _Story) -> None:
    t = s.person(pool=_TEACHERS)
    d, g = s.num(2, 6), s.num(2, 8)
    s.say(f"{t.name} has {d * g} students in {t.his} class. {t.He} puts them into groups of {d}.")
    groups = s.step("There are", d * g, "/", d, " groups.")
    if s.steps == 1:
        return s.ask("How many groups are there?")
    b = s.num(2, 9)
    s.say(f"Each group gets {b} markers.")
    used = s.step(f"{t.He} hands out", groups, "*", b, " markers.")
    if s.steps == 2:
        return s.ask(f"How many markers does {t.name} hand out?")
    box = used + s.num(1, 20)
    s.say(f"{t.He} had a box of {box} markers.")
    s.step("There are", box, "-", used, " markers left in the box.")
    s.ask("How many markers are left in the box?")


@_template("sports")
def soccer_goals(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 5), s.num(3, 8)
    s.say(f"{p.name} scores {a} goals in each of {b} soccer games.")
    goals = s.step(f"{p.He} scores", a, "*", b, " goals.")
    if s.steps == 1:
        return s.ask(f"How many goals does {p.name} score in the {b} games?")
    c = s.num(2, 6)
    s.say(f"In the final game, {p.he} scores {c} more goals.")
    goals = s.step(f"{p.He} scores", goals, "+", c, " goals this season.")
    if s.steps == 2:
        return s.ask(f"How many goals does {p.name} score this season?")
    mate = s.person(p)
    s.say(f"{p.His} teammate {mate.name} scores half as many goals as {p.name} this season.")
    s.step(f"{mate.name} scores", goals, "/", 2, " goals.")
    s.ask(f"How many goals does {mate.name} score this season?")


@_template("sports")
def swim_laps(s: _Story) -> None:
    p = s.person()
    a = s.num(8, 20)
    b = s.num(2, a - 3)
    s.say(f"{p.name} swims {a} laps on Monday. On Tuesday {p.he} swims {b} fewer laps than on Monday.")
    tue = s.step(f"On Tuesday {p.he} swims", a, "-", b, " laps.")
    if s.steps == 1:
        return s.ask(f"How many laps does {p.name} swim on Tuesday?")
    both = s.step(f"{p.He} swims", a, "+", tue, " laps on the two days.")
    if s.steps == 2:
        return s.ask(f"How many laps does {p.name} swim on Monday and Tuesday together?")
    goal = both + s.num(3, 25)
    s.say(f"{p.He} wants to swim {goal} laps this week.")
    s.step(f"{p.He} needs", goal, "-", both, " more laps.")
    s.ask(f"How many more laps does {p.name} need to swim to reach {p.his} goal?")


@_template("sports")
def basketball_points(s: _Story) -> None:
    p = s.person()
    a = s.num(2, 9)
    s.say(f"{p.name} makes {a} baskets in a game. Each basket is worth 2 points.")
    pts = s.step(f"{p.He} scores", a, "*", 2, " points from baskets.")
    if s.steps == 1:
        return s.ask(f"How many points does {p.name} score?")
    c = s.num(2, 8)
    s.say(f"{p.He} also scores {c} points from free throws.")
    pts = s.step(f"{p.He} scores", pts, "+", c, " points in all.")
    if s.steps == 2:
        return s.ask(f"How many points does {p.name} score in all?")
    team = pts + s.num(5, 40)
    s.say(f"{p.His} team scores {team} points in the game.")
    s.step(f"{p.His} teammates score", team, "-", pts, " points.")
    s.ask(f"How many points do {p.name}'s teammates score?")


@_template("travel")
def bike_ride(s: _Story) -> None:
    p = s.person()
    a, b = s.num(4, 15), s.num(2, 5)
    s.say(f"{p.name} rides {p.his} bike {a} miles each hour. {p.He} rides for {b} hours.")
    miles = s.step(f"{p.He} rides", a, "*", b, " miles.")
    if s.steps == 1:
        return s.ask(f"How many miles does {p.name} ride?")
    c = s.num(2, 12)
    s.say(f"Then {p.he} rides {c} more miles to the lake.")
    miles = s.step(f"{p.He} rides", miles, "+", c, " miles to the lake.")
    if s.steps == 2:
        return s.ask(f"How many miles does {p.name} ride to get to the lake?")
    s.say(f"{p.He} rides back home the same way.")
    s.step(f"{p.He} rides", miles, "*", 2, " miles there and back.")
    s.ask(f"How many miles does {p.name} ride in all?")


@_template("travel")
def museum_trip(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 6), s.num(3, 12)
    s.say(f"{p.name} goes to the museum with friends. They are {a} people, and a ticket costs ${b}.")
    cost = s.step("The tickets cost", a, "*", b, ".", money=True)
    if s.steps == 1:
        return s.ask("How much do the tickets cost in all?")
    c = a * s.num(1, 5) if s.steps == 3 else s.num(3, 20)
    s.say(f"They also buy snacks for ${c}.")
    cost = s.step("They spend", cost, "+", c, " in all.", money=True)
    if s.steps == 2:
        return s.ask("How much do they spend in all?")
    s.say("They split the total cost equally.")
    s.step("Each person pays", cost, "/", a, ".", money=True)
    s.ask("How much does each person pay?")


@_template("travel")
def bus_riders(s: _Story) -> None:
    a = s.num(10, 35)
    b = s.num(2, a - 2)
    s.say(f"A bus leaves the station with {a} people on it. At the first stop, {b} people get off.")
    on = s.step("There are", a, "-", b, " people on the bus.")
    if s.steps == 1:
        return s.ask("How many people are on the bus after the first stop?")
    c = s.num(2, 15)
    s.say(f"At the second stop, {c} people get on.")
    on = s.step("There are", on, "+", c, " people on the bus.")
    if s.steps == 2:
        return s.ask("How many people are on the bus after the second stop?")
    seats = on + s.num(2, 20)
    s.say(f"The bus has {seats} seats and everyone is sitting.")
    s.step("There are", seats, "-", on, " empty seats.")
    s.ask("How many seats are empty?")


@_template("animals")
def zoo_bananas(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 8), s.num(2, 6)
    s.say(f"{p.name} works at a zoo. {p.He} gives each of the {a} monkeys {b} bananas a day.")
    day = s.step(f"{p.He} gives out", a, "*", b, " bananas a day.")
    if s.steps == 1:
        return s.ask("How many bananas do the monkeys eat in one day?")
    d = s.num(2, 7)
    s.check(day * d < MAX_VALUE)
    s.say(f"{p.He} feeds them the same way for {d} days.")
    total = s.step("The monkeys eat", day, "*", d, " bananas.")
    if s.steps == 2:
        return s.ask(f"How many bananas do the monkeys eat in {d} days?")
    e = s.divisor(total, 3, 12)
    s.say(f"Bananas come in bunches of {e}.")
    s.step(f"{p.He} needs", total, "/", e, " bunches.")
    s.ask(f"How many bunches of bananas does {p.name} need?")


@_template("animals")
def hen_eggs(s: _Story) -> None:
    p = s.person()
    a, b = s.num(2, 9), s.num(3, 7)
    s.say(f"{p.name} has {a} hens. Each hen lays {b} eggs a week.")
    eggs = s.step("The hens lay", a, "*", b, " eggs a week.")
    if s.steps == 1:
        return s.ask("How many eggs do the hens lay in a week?")
    c = s.num(2, min(eggs - 2, 15))
    s.say(f"{p.He} uses {c} eggs to bake cakes.")
    left = s.step(f"{p.He} has", eggs, "-", c, " eggs left.")
    if s.steps == 2:
        return s.ask(f"How many eggs does {p.name} have left?")
    d = s.divisor(left, 2, 12)
    s.say(f"{p.He} puts the rest into cartons that hold {d} eggs each.")
    s.step(f"{p.He} fills", left, "/", d, " cartons.")
    s.ask(f"How many cartons does {p.name} fill?")


@_template("animals")
def pet_food(s: _Story) -> None:
    p = s.person()
    pet = s.pick(["dog", "cat", "rabbit", "parrot", "hamster"])
    a = s.num(2, 5)
    s.say(f"{p.name}'s {pet} eats {a} scoops of food a day.")
    week = s.step(f"The {pet} eats", a, "*", 7, " scoops a week.")
    if s.steps == 1:
        return s.ask(f"How many scoops of food does the {pet} eat in a week?")
    bag = week + (a * s.num(2, 8) if s.steps == 3 else s.num(2, 30))
    s.say(f"{p.He} opens a new bag with {bag} scoops of food and feeds the {pet} from it for one week.")
    left = s.step("There are", bag, "-", week, " scoops left in the bag.")
    if s.steps == 2:
        return s.ask("How many scoops are left in the bag after one week?")
    s.step("The rest lasts", left, "/", a, " more days.")
    s.ask(f"For how many more days can the {pet} eat from the bag?")


@_template("saving money")
def weekly_savings(s: _Story) -> None:
    p = s.person()
    b, c = s.num(2, 12), s.num(2, 10)
    s.say(f"{p.name} saves ${b} every week for {c} weeks.")
    saved = s.step(f"{p.He} saves", b, "*", c, ".", money=True)
    if s.steps == 1:
        return s.ask(f"How much money does {p.name} save?")
    a = s.num(3, 30)
    s.say(f"{p.He} already had ${a} in {p.his} piggy bank before {p.he} started saving.")
    total = s.step(f"{p.He} has", saved, "+", a, ".", money=True)
    if s.steps == 2:
        return s.ask(f"How much money does {p.name} have now?")
    thing = s.pick(["a video game", "a pair of shoes", "a board game", "a toy robot", "a book set"])
    t = s.num(5, total - 1)
    s.say(f"Then {p.he} buys {thing} for ${t}.")
    s.step(f"{p.He} has", total, "-", t, " left.", money=True)
    s.ask(f"How much money does {p.name} have left?")


@_template("saving money")
def bike_goal(s: _Story) -> None:
    p = s.person()
    thing = s.pick(["a bike", "a guitar", "a skateboard", "a tablet", "a telescope"])
    a, g = s.num(5, 40), s.num(3, 20)
    w, weeks = s.num(2, 10), s.num(2, 10)
    need = g + (w * weeks if s.steps == 3 else s.num(3, 40))
    s.check(a + need < MAX_VALUE)
    s.say(f"{p.name} wants to buy {thing} that costs ${a + need}. {p.He} has ${a}.")
    need = s.step(f"{p.He} needs", a + need, "-", a, " more.", money=True)
    if s.steps == 1:
        return s.ask(f"How much more money does {p.name} need?")
    s.say(f"{p.His} grandmother gives {p.him} ${g}.")
    need = s.step(f"Now {p.he} needs", need, "-", g, " more.", money=True)
    if s.steps == 2:
        return s.ask(f"How much more money does {p.name} need now?")
    s.say(f"{p.He} saves ${w} each week.")
    s.step(f"{p.He} needs", need, "/", w, " weeks.")
    s.ask(f"How many weeks does {p.name} need to save?")


@_template("gardening")
def tomato_garden(s: _Story) -> None:
    p = s.person()
    plant, fruit = s.pick([("tomato plants", "tomatoes"), ("pepper plants", "peppers"),
                           ("bean plants", "beans"), ("strawberry plants", "strawberries")])
    a, b = s.num(2, 5), s.num(3, 8)
    s.say(f"{p.name} plants {a} rows of {plant} with {b} plants in each row.")
    total = s.step(f"{p.He} plants", a, "*", b, " plants.")
    if s.steps == 1:
        return s.ask(f"How many {plant} does {p.name} plant?")
    c = s.num(2, min(total - 2, 8))
    s.say(f"Then {c} of the plants die.")
    alive = s.step("There are", total, "-", c, " plants left.")
    if s.steps == 2:
        return s.ask("How many plants are left?")
    d = s.num(2, 6)
    s.say(f"Each plant that is left grows {d} {fruit}.")
    s.step(f"{p.He} picks", alive, "*", d, f" {fruit}.")
    s.ask(f"How many {fruit} does {p.name} pick?")


@_template("hobbies")
def sticker_album(s: _Story) -> None:
    p = s.person()
    a, b = s.num(4, 25), s.num(3, 20)
    friend = s.person(p)
    s.say(f"{p.name} has {a} stickers. {friend.name} gives {p.him} {b} more stickers.")
    total = s.step(f"{p.He} has", a, "+", b, " stickers.")
    if s.steps == 1:
        return s.ask(f"How many stickers does {p.name} have now?")
    d = s.divisor(total, 2, 6)
    s.say(f"{p.He} puts all of them in an album, the same number on each of {d} pages.")
    per = s.step("Each page has", total, "/", d, " stickers.")
    if s.steps == 2:
        return s.ask("How many stickers are on each page?")
    e = s.num(2, 6)
    s.say(f"Later {p.he} adds {e} more stickers to each page.")
    s.step("Each page has", per, "+", e, " stickers now.")
    s.ask("How many stickers are on each page now?")


@_template("hobbies")
def piano_practice(s: _Story) -> None:
    p = s.person()
    instrument = s.pick(["piano", "violin", "guitar", "flute", "drums"])
    a, b = s.pick([10, 15, 20, 25, 30]), s.num(2, 6)
    s.say(f"{p.name} practices the {instrument} for {a} minutes a day on {b} days.")
    mins = s.step(f"{p.He} practices", a, "*", b, " minutes.")
    if s.steps == 1:
        return s.ask(f"How many minutes does {p.name} practice?")
    c = s.pick([5, 10, 15, 20, 25, 30])
    s.say(f"On Sunday {p.he} practices for {c} more minutes.")
    mins = s.step(f"{p.He} practices", mins, "+", c, " minutes in all.")
    if s.steps == 2:
        return s.ask(f"How many minutes does {p.name} practice in all?")
    d = s.divisor(mins, 2, 5)
    s.say(f"{p.He} spends the same time on each of {d} songs.")
    s.step(f"{p.He} practices each song for", mins, "/", d, " minutes.")
    s.ask(f"How many minutes does {p.name} practice each song?")


@_template("toys")
def marble_compare(s: _Story) -> None:
    p = s.person()
    q = s.person(p)
    r = s.person(p, q)
    a, m = s.num(2, 12), s.num(2, 5)
    s.say(f"{p.name} has {a} marbles. {q.name} has {m} times as many marbles as {p.name}.")
    qm = s.step(f"{q.name} has", a, "*", m, " marbles.")
    if s.steps == 1:
        return s.ask(f"How many marbles does {q.name} have?")
    c = s.num(2, qm - 1)
    s.say(f"{r.name} has {c} fewer marbles than {q.name}.")
    rm = s.step(f"{r.name} has", qm, "-", c, " marbles.")
    if s.steps == 2:
        return s.ask(f"How many marbles does {r.name} have?")
    s.step("Together they have", qm, "+", rm, " marbles.")
    s.ask(f"How many marbles do {q.name} and {r.name} have together?")


@_template("family")
def sibling_ages(s: _Story) -> None:
    p = s.person()
    q = s.person(p)
    r = s.person(p, q)
    a, b = s.num(3, 14), s.num(2, 12)
    s.say(f"{p.name} is {a} years old. {q.name} is {b} years older than {p.name}.")
    qa = s.step(f"{q.name} is", a, "+", b, " years old.")
    if s.steps == 1:
        return s.ask(f"How old is {q.name}?")
    s.check(qa % 2 == 0)
    s.say(f"Their cousin {r.name} is half as old as {q.name}.")
    ra = s.step(f"{r.name} is", qa, "/", 2, " years old.")
    if s.steps == 2:
        return s.ask(f"How old is {r.name}?")
    s.step("The sum of their ages is", a, "+", ra, ".")
    s.ask(f"What is the sum of {p.name}'s age and {r.name}'s age?")


def templates() -> dict[str, str]:
    """Template name -> domain."""
    return {name: domain for name, (domain, _) in _TEMPLATES.items()}


def _draw(rng: random.Random, name: str, steps: int) -> _Story:
    """Redraw the numbers of one (template, steps) until they fit, so retries do not skew which are used."""
    for _ in range(1000):
        story = _Story(rng, steps)
        try:
            _TEMPLATES[name][1](story)
        except _Retry:
            continue
        assert len(story.lines) == steps and story.question, f"template {name} wrote {len(story.lines)} steps"
        return story
    raise RuntimeError(f"template {name} found no numbers that fit for {steps} steps")


def sample_problems(n: int, seed: int, max_steps: int = MAX_STEPS) -> list[WordProblem]:
    """``n`` unique problems with their template and step count; the step count is uniform in 1..max_steps."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= max_steps <= MAX_STEPS:
        raise ValueError(f"max_steps must be in 1..{MAX_STEPS} (the longest story has {MAX_STEPS} steps), "
                         f"got {max_steps}")
    rng = random.Random(seed)
    names = sorted(_TEMPLATES)
    out: list[WordProblem] = []
    seen: set[str] = set()
    draws, max_draws = 0, 100 * n + 1000
    while len(out) < n:
        draws += 1
        if draws > max_draws:
            raise ValueError(f"only {len(out)} unique problems after {max_draws} draws (asked for {n}); "
                             f"ask for fewer problems")
        name, steps = rng.choice(names), rng.randint(1, max_steps)
        story = _draw(rng, name, steps)
        question = " ".join(story.sentences + [story.question])
        if question in seen:
            continue
        seen.add(question)
        answer = "\n".join(story.lines + [f"#### {story.value}"])
        out.append(WordProblem(question, answer, story.value, steps, name))
    return out


def make_word_problems(n: int, seed: int, max_steps: int = MAX_STEPS) -> list[dict]:
    """``n`` unique GSM8k rows ``{"question", "answer"}``, deterministic for ``seed``."""
    return [p.row() for p in sample_problems(n, seed, max_steps)]


def write_gsm8k_jsonl(out_dir: str, train_size: int, test_size: int, seed: int = 0,
                      max_steps: int = MAX_STEPS) -> dict[str, str]:
    """Write ``train.jsonl`` and ``test.jsonl`` (no question in both) atomically; returns {split: path}.

    One draw of test_size + train_size problems: the test split is its first test_size rows, so the test set
    does not change when only train_size does.
    """
    for key, size in (("train_size", train_size), ("test_size", test_size)):
        if size < 1:
            raise ValueError(f"{key} must be >= 1, got {size}")
    rows = make_word_problems(test_size + train_size, seed, max_steps)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, part in (("test", rows[:test_size]), ("train", rows[test_size:])):
        path = os.path.join(out_dir, f"{split}.jsonl")
        # a hidden temp name, so a crash never leaves a file that datasets would read as a split
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{split}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        paths[split] = path
    return {"train": paths["train"], "test": paths["test"]}
