"""Cross-party recall cases: a fact held by one party, the question about it held by the last.

Every case is drawn deterministically from (seed, index): N = 2..6 participants, a kind of
fact (code, name, number, place, date), the holder among the non-generators, and for every
non-generator a page of office notes (50-400 tokens, measured with the model's tokenizer)
written from templates, with the fact in a random spot of the holder's page. The other
pages carry facts of the same shapes about other things, so the answer has to be the
right one, not merely one of the right kind. The last participant holds only the question.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("code", "name", "number", "place", "date")
MIN_TOKENS, MAX_TOKENS = 50, 400  # each non-generator's page
PARTICIPANTS = range(2, 7)

_FIRST = ["Amara", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Keira",
          "Luca", "Mei", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Soren", "Tala", "Umar", "Vera", "Wen", "Yusuf"]
_LAST = ["Okafor", "Lindqvist", "Moreau", "Castellano", "Nakamura", "Brennan", "Haddad", "Kowalski", "Ferreira",
         "Adeyemi", "Novak", "Sorensen", "Takahashi", "Quiroga", "Valdez", "Whitfield", "Petrov", "Achebe"]
_CITIES = ["Lisbon", "Rotterdam", "Krakow", "Valencia", "Helsinki", "Porto", "Ljubljana", "Antwerp", "Tallinn",
           "Bologna", "Seville", "Gdansk", "Bergen", "Lyon", "Dublin", "Tbilisi", "Zagreb", "Salzburg"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_PLACES = ["north warehouse", "east loading dock", "server room", "archive cellar", "rooftop plant room",
           "second-floor lab", "west stairwell", "cold store", "records office", "garage annex"]
_PROJECTS = ["Harbour", "Juniper", "Falcon", "Meridian", "Copperleaf", "Northwind", "Atlas", "Bluebird", "Keystone",
             "Saffron", "Granite", "Tidewater"]
_ITEMS = ["printer paper", "safety gloves", "coffee filters", "cable ties", "label rolls", "hand sanitiser",
          "packing tape", "batteries", "folders", "shipping boxes"]
_EVENTS = ["supplier summit", "annual board retreat", "sales kickoff", "partner workshop", "product launch",
           "audit review", "customer forum", "design sprint"]
_CONTRACTS = ["cleaning contract", "lease on the depot", "software licence", "insurance policy", "catering agreement",
              "maintenance contract", "courier agreement", "parking permit"]
_TEAMS = ["finance", "logistics", "legal", "facilities", "procurement", "support", "marketing", "research"]


@dataclass(frozen=True)
class Fact:
    statement: str  # the sentence the holder's page contains
    question: str
    answer: str  # what a right answer says (shown in the results)
    pattern: str  # regex an output must contain (case-insensitive)


@dataclass(frozen=True)
class RecallCase:
    index: int
    kind: str
    participants: int  # N; the last participant asks
    holder: int  # who holds the fact (never the last)
    parts: tuple[str, ...]  # each participant's text
    fact: Fact

    def correct(self, output: str) -> bool:
        return re.search(self.fact.pattern, output, re.IGNORECASE) is not None


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _fact(kind: str, rng: random.Random, subject: str | None = None) -> Fact:
    """A fact of `kind` (about `subject` when given, else a random one)."""
    if kind == "code":
        place, code = subject or rng.choice(_PLACES), f"{rng.randrange(1000, 10000)}"
        return Fact(f"The door code for the {place} is {code}.", f"What is the door code for the {place}?", code,
                    rf"(?<!\d){code}(?!\d)")
    if kind == "name":
        project, person = subject or rng.choice(_PROJECTS), _person(rng)
        first, surname = person.split()
        return Fact(f"The new lead of project {project} is {person}.", f"Who is the new lead of project {project}?",
                    person, rf"\b{first}\s+{surname}\b")
    if kind == "number":
        item, count = subject or rng.choice(_ITEMS), rng.randrange(12, 990)
        return Fact(f"Order {rng.randrange(100, 999)} holds {count} boxes of {item}.",
                    f"How many boxes of {item} does the order hold?", str(count), rf"(?<!\d){count}(?!\d)")
    if kind == "place":
        event, city = subject or rng.choice(_EVENTS), rng.choice(_CITIES)
        return Fact(f"This year the {event} will take place in {city}.", f"In which city will the {event} take place?",
                    city, rf"\b{city}\b")
    if kind == "date":
        contract, month, day = subject or rng.choice(_CONTRACTS), rng.choice(_MONTHS), rng.randrange(1, 29)
        return Fact(f"The {contract} runs out on {month} {day}.", f"On what date does the {contract} run out?",
                    f"{month} {day}", rf"\b{month}\s+{day}(?:st|nd|rd|th)?\b")
    raise ValueError(f"kind: unknown {kind!r}; one of {KINDS}")


_SUBJECTS = {"code": _PLACES, "name": _PROJECTS, "number": _ITEMS, "place": _EVENTS, "date": _CONTRACTS}


def _filler(rng: random.Random) -> str:
    """One sentence of everyday office notes."""
    return rng.choice([
        lambda: f"The {rng.choice(_TEAMS)} team moved its weekly review to {rng.choice(_DAYS)} at {rng.randrange(8, 18)}:00.",
        lambda: f"{_person(rng)} will cover the front desk while {_person(rng)} is on leave.",
        lambda: f"Invoice {rng.randrange(1000, 9999)} from the {rng.choice(_CITIES)} office was paid in full.",
        lambda: f"The printer in the {rng.choice(_PLACES)} needs new toner again.",
        lambda: f"Remember to log visitors at reception before {rng.randrange(9, 12)} am.",
        lambda: f"The {rng.choice(_TEAMS)} budget for the quarter is still under review.",
        lambda: f"{_person(rng)} asked everyone to keep the kitchen tidy after lunch.",
        lambda: f"The fire drill on {rng.choice(_DAYS)} went smoothly and took {rng.randrange(5, 20)} minutes.",
        lambda: f"New badges for the {rng.choice(_TEAMS)} team arrive next week.",
        lambda: f"The courier from {rng.choice(_CITIES)} was late twice this month.",
        lambda: f"{_person(rng)} is organising the leaving drinks on {rng.choice(_DAYS)}.",
        lambda: f"The heating in the {rng.choice(_PLACES)} has been fixed.",
    ])()


def _page(rng: random.Random, tokenizer, owner: str, target: int, kind: str, avoid: str, fact: Fact | None) -> str:
    """`owner`'s notes of about `target` tokens: fillers, same-shape facts about other subjects, and `fact`."""
    sentences: list[str] = []
    others = [s for s in _SUBJECTS[kind] if s != avoid]
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
        if rng.random() < 0.15:
            sentences.append(_fact(kind, rng, rng.choice(others)).statement)
        else:
            sentences.append(_filler(rng))
        text = " ".join(sentences)
    if fact is not None:
        sentences.insert(rng.randrange(len(sentences) + 1), fact.statement)
    return f"{owner}'s notes: " + " ".join(sentences) + " "


def make_case(tokenizer, index: int, seed: int = 0) -> RecallCase:
    """Case `index` of the benchmark: N and kind cycle so that every (N, kind) pair is equally common."""
    rng = random.Random(f"recall-{seed}-{index}")
    n = PARTICIPANTS[index % len(PARTICIPANTS)]
    kind = KINDS[(index // len(PARTICIPANTS)) % len(KINDS)]
    subject = rng.choice(_SUBJECTS[kind])
    fact = _fact(kind, rng, subject)
    holder = rng.randrange(n - 1)
    owners = rng.sample(_FIRST, n - 1)
    parts = [_page(rng, tokenizer, owners[m], rng.randint(MIN_TOKENS, MAX_TOKENS), kind, subject,
                   fact if m == holder else None) for m in range(n - 1)]
    parts.append(f"Question: {fact.question} Answer briefly, using the notes above.")
    return RecallCase(index, kind, n, holder, tuple(parts), fact)


def make_cases(
    tokenizer, count: int, seed: int = 0, offset: int = 0, participants: int | None = None
) -> list[RecallCase]:
    """Cases offset..offset+count-1 of the benchmark; with `participants`, of its cases with that N only."""
    if participants is None:
        return [make_case(tokenizer, i, seed) for i in range(offset, offset + count)]
    if participants not in PARTICIPANTS:
        raise ValueError(f"participants: {participants} is not in {PARTICIPANTS.start}..{PARTICIPANTS.stop - 1}")
    first = PARTICIPANTS.index(participants)
    return [make_case(tokenizer, first + i * len(PARTICIPANTS), seed) for i in range(offset, offset + count)]
