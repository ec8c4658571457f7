"""Generate the demo dataset (seeded, committed under data/demo/): extract facts from a sentence into
one exact JSON line. The base model answers in prose or loose JSON; LoRA learns the format in minutes.

    python scripts/make_demo_data.py            # writes data/demo/train.jsonl and data/demo/valid.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Maria", "Jonas", "Aiko", "Pedro", "Fatima", "Liam", "Sofia", "Kwame", "Elena", "Ravi", "Nora", "Mateo",
         "Yuki", "Omar", "Ingrid", "Chen", "Amara", "Lucas", "Zara", "Tomas", "Hana", "Diego", "Leila", "Felix",
         "Priya", "Viktor", "Mei", "Samuel", "Anya", "Rafael", "Nadia", "Hugo", "Lena", "Emeka", "Clara", "Ivan"]
HELD_OUT_NAMES = ["Greta", "Malik", "Rosa", "Kenji", "Olga", "Tariq", "Beatriz", "Arjun", "Sven", "Ines"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Lima", "Oslo", "Dublin", "Cairo", "Quito", "Krakow", "Hanoi", "Porto",
          "Denver", "Accra", "Seville", "Tallinn", "Bergen", "Malaga", "Dakar", "Busan", "Leeds"]
JOBS = ["teacher", "nurse", "carpenter", "chef", "pilot", "baker", "lawyer", "painter", "farmer", "engineer",
        "librarian", "dentist", "plumber", "florist", "tailor"]
TEMPLATES = [
    "{name} is {age} years old and works as a {job} in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{city} is home to {name}, who is {age} and works as a {job}.",
    "At {age}, {name} is a {job} living in {city}.",
    "The {job} {name} ({age}) moved to {city} last spring.",
    "Our new neighbour in {city} is {name}; she is {age} and a {job} by trade.",
]
INSTRUCTION = "Extract the person's name, age and city as JSON."


def record(rng: random.Random, names: list[str]) -> dict:
    name, city, job = rng.choice(names), rng.choice(CITIES), rng.choice(JOBS)
    age = rng.randint(19, 88)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, job=job, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
                         {"role": "assistant", "content": answer}]}


def main(out: Path = Path(__file__).parents[1] / "data" / "demo", n_train: int = 320, n_valid: int = 40) -> None:
    rng = random.Random(1234)
    out.mkdir(parents=True, exist_ok=True)
    train = [record(rng, NAMES) for _ in range(n_train)]
    valid = [record(rng, HELD_OUT_NAMES) for _ in range(n_valid)]  # names never seen in training
    for name, recs in (("train.jsonl", train), ("valid.jsonl", valid)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(valid)} valid records to {out}")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__).parse_args()  # (--help says what it does, and does nothing)
    main()
