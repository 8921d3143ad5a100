"""Write llmray's sample datasets (deterministic; answers computed or hand-checked).

    python examples/data/make_samples.py      # rewrites the .jsonl files next to this script

- instruction.jsonl (~200) / instruction_eval.jsonl (~20): format `instruction`. Every
  response has the same recognisable shape, "Ray here! <answer>\\n\\nHappy to help!", so a
  few dozen LoRA steps visibly change how a model answers (the demo's before / after).
- text.jsonl (~100): format `text`, `<USER>...</USER><ASSISTANT>...</ASSISTANT>`, for
  `specialTokens: ["<USER>", "</USER>", "<ASSISTANT>", "</ASSISTANT>"]`.
- chat.jsonl (~100): format `chat`; single and multi-turn, some with a system message.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 7
SIGN_ON, SIGN_OFF = "Ray here! ", "\n\nHappy to help!"

QA = tuple[str, str, str]  # (instruction, context, answer)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília", "Argentina": "Buenos Aires",
    "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi", "Nigeria": "Abuja",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Iceland": "Reykjavik", "Morocco": "Rabat", "Ghana": "Accra", "Colombia": "Bogotá",
    "Belgium": "Brussels", "Czech Republic": "Prague", "Romania": "Bucharest", "Cuba": "Havana",
}  # fmt: skip

DEFINITIONS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to "
    "make sugar and release oxygen",
    "a prime number": "a whole number greater than 1 whose only divisors are 1 and itself",
    "gravity": "the force by which masses attract each other; it keeps us on the ground",
    "an atom": "the smallest unit of a chemical element, made of a nucleus and electrons",
    "evaporation": "the change of a liquid into a gas, as when water dries in the sun",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action or a state, such as run or be",
    "an adjective": "a word that describes a noun, such as red or quick",
    "democracy": "a system of government in which citizens choose their leaders by voting",
    "inflation": "a general rise in prices, so that money buys less over time",
    "a mammal": "a warm-blooded animal with hair that feeds its young with milk",
    "a planet": "a large body that orbits a star and has cleared its orbit of other objects",
    "an algorithm": "a finite list of precise steps that solves a problem",
    "a variable": "a named place in a program that holds a value",
    "a fraction": "a number that expresses part of a whole, written as a/b",
    "a volcano": "an opening in Earth's crust through which molten rock and gases escape",
    "an ecosystem": "a community of living things together with their physical environment",
    "a synonym": "a word that means the same or nearly the same as another word",
    "an antonym": "a word that means the opposite of another word",
    "a triangle": "a flat shape with three straight sides and three angles",
    "a hypothesis": "a testable explanation proposed before an experiment",
    "a molecule": "two or more atoms held together by chemical bonds",
    "a perimeter": "the total length of the boundary of a flat shape",
    "erosion": "the wearing away of rock and soil by water, wind or ice",
    "a battery": "a device that stores chemical energy and releases it as electricity",
}

HOW_TOS = {
    "boil an egg": "1. Put the egg in a pot and cover it with cold water. 2. Bring the water to "
    "a boil. 3. Simmer for 7 to 9 minutes for a firm yolk. 4. Cool the egg in cold water.",
    "make a cup of tea": "1. Boil water. 2. Put a tea bag in a cup. 3. Pour the hot water "
    "over it. 4. Steep for 3 to 5 minutes, then remove the bag.",
    "plant a seed": "1. Fill a pot with moist soil. 2. Press the seed in about twice as deep "
    "as it is wide. 3. Cover it lightly. 4. Keep the soil damp and the pot in the light.",
    "wash your hands properly": "1. Wet your hands. 2. Apply soap. 3. Scrub all surfaces for "
    "at least 20 seconds. 4. Rinse. 5. Dry with a clean towel.",
    "tie a simple knot": "1. Make a loop in the rope. 2. Pass one end through the loop. "
    "3. Pull both ends to tighten.",
    "save a file in most programs": "Press Ctrl+S (Cmd+S on a Mac), or choose File > Save.",
    "create a strong password": "1. Use at least 12 characters. 2. Mix words, numbers and "
    "symbols. 3. Never reuse it on another site. 4. Store it in a password manager.",
    "make a paper airplane": "1. Fold a sheet in half lengthwise and unfold it. 2. Fold the "
    "top corners to the center line. 3. Fold the new edges to the center again. 4. Fold in "
    "half and fold down the wings.",
    "check a car's tire pressure": "1. Remove the valve cap. 2. Press a gauge onto the valve. "
    "3. Read the pressure. 4. Compare it with the value on the driver's door label.",
    "start a Python virtual environment": "1. Run python -m venv .venv. 2. Activate it with "
    "source .venv/bin/activate (or .venv\\Scripts\\activate on Windows).",
    "remember a list of items": "Link each item to a vivid image and place the images along "
    "a familiar route, such as the rooms of your home.",
    "fall asleep more easily": "1. Keep a regular bedtime. 2. Avoid screens for an hour "
    "before bed. 3. Keep the room dark and cool. 4. Skip caffeine after noon.",
    "clean a computer keyboard": "1. Unplug it. 2. Turn it upside down and shake out the "
    "crumbs. 3. Use compressed air between the keys. 4. Wipe the keys with a damp cloth.",
    "write a good email subject line": "Keep it short and specific: say what the email is "
    "about and any action needed, for example: Budget review due Friday.",
    "measure a room's area": "Measure the length and the width in the same unit and multiply "
    "them: a 4 m by 3 m room has an area of 12 square meters.",
}

ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "open": "closed",
    "early": "late", "light": "dark", "full": "empty", "strong": "weak", "rich": "poor",
    "up": "down", "inside": "outside", "begin": "end", "win": "lose", "always": "never",
}  # fmt: skip

PAST_TENSE = [
    ("She walks to school.", "She walked to school."),
    ("They play football every Sunday.", "They played football every Sunday."),
    ("I write a letter.", "I wrote a letter."),
    ("We eat dinner at seven.", "We ate dinner at seven."),
    ("He runs in the park.", "He ran in the park."),
    ("The bird sings.", "The bird sang."),
    ("You buy fresh bread.", "You bought fresh bread."),
    ("The children swim in the lake.", "The children swam in the lake."),
]

FORMAL = [
    ("hey, can u send me the report asap?", "Hello, could you please send me the report as "
     "soon as possible?"),
    ("thx for the help!", "Thank you very much for your help."),
    ("gonna be late, sorry", "I apologize, but I will be arriving late."),
    ("wanna grab lunch tomorrow?", "Would you like to have lunch together tomorrow?"),
    ("pls fix the bug", "Could you please fix the bug?"),
    ("got ur message, will reply soon", "I have received your message and will reply "
     "shortly."),
]  # fmt: skip

WORDS = [
    "apple", "river", "garden", "pencil", "orange", "mountain", "window", "banana", "planet",
    "candle", "forest", "yellow", "bridge", "silver", "rocket", "tomato", "jacket", "island",
    "guitar", "camera", "puzzle", "summer", "winter", "castle", "dragon", "violin", "coffee",
]  # fmt: skip

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Ray makes distributed computing simple",
    "Fine tuning adapts a model to new data",
    "Kubernetes schedules containers across a cluster",
    "A small model can still learn a clear style",
    "Water boils at one hundred degrees Celsius at sea level",
    "The library opens at nine in the morning",
    "Every good test should be fast and deterministic",
]


def styled(answer: str) -> str:
    return f"{SIGN_ON}{answer}{SIGN_OFF}"


def number(x: float) -> str:
    """12, 12.5, 2.54: no trailing zeros."""
    return f"{x:.4f}".rstrip("0").rstrip(".")


# --- generators of (instruction, context, answer) ---


def arithmetic(rng: random.Random) -> QA:
    op = rng.choice("+-*/")
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if op == "+":
        return f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}."
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", "", f"{a} - {b} = {a - b}."
    if op == "*":
        a, b = rng.randint(2, 25), rng.randint(2, 25)
        return f"Multiply {a} by {b}.", "", f"{a} x {b} = {a * b}."
    b, q = rng.randint(2, 12), rng.randint(2, 30)
    return f"What is {b * q} divided by {b}?", "", f"{b * q} / {b} = {q}."


CAPITAL_QUESTIONS = [
    "What is the capital of {}?",
    "Name the capital city of {}.",
    "Which city is the capital of {}?",
]


def capital(rng: random.Random) -> QA:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(CAPITAL_QUESTIONS).format(country)
    return question, "", f"The capital of {country} is {CAPITALS[country]}."


CONVERSIONS: list[tuple[str, str, float, bool]] = [
    # (from unit, to unit, factor, exact)
    ("kilometers", "meters", 1000, True),
    ("meters", "centimeters", 100, True),
    ("kilograms", "grams", 1000, True),
    ("hours", "minutes", 60, True),
    ("minutes", "seconds", 60, True),
    ("days", "hours", 24, True),
    ("feet", "inches", 12, True),
    ("yards", "feet", 3, True),
    ("liters", "milliliters", 1000, True),
    ("inches", "centimeters", 2.54, True),
    ("miles", "kilometers", 1.609344, False),
    ("pounds", "kilograms", 0.45359237, False),
]


def conversion(rng: random.Random) -> QA:
    if rng.random() < 0.2:  # temperature: multiples of 5 degrees C give whole degrees F
        c = 5 * rng.randint(-8, 20)
        return (
            f"Convert {c} degrees Celsius to Fahrenheit.",
            "",
            f"{c} °C is {c * 9 // 5 + 32} °F (multiply by 9/5, then add 32).",
        )
    src, dst, factor, exact = rng.choice(CONVERSIONS)
    value = rng.randint(2, 40)
    result = value * factor
    shown = number(result) if exact else f"about {round(result, 2):g}"
    return f"Convert {value} {src} to {dst}.", "", f"{value} {src} is {shown} {dst}."


def definition(rng: random.Random) -> QA:
    term = rng.choice(sorted(DEFINITIONS))
    ask = rng.choice(["What is {}?", "Define {}.", "Explain in one sentence what {} is."])
    return ask.format(term), "", f"{term[0].upper()}{term[1:]} is {DEFINITIONS[term]}."


def how_to(rng: random.Random) -> QA:
    task = rng.choice(sorted(HOW_TOS))
    return f"How do I {task}?", "", HOW_TOS[task]


def rewrite(rng: random.Random) -> QA:
    kind = rng.randrange(5)
    if kind == 0:
        src, dst = rng.choice(PAST_TENSE)
        return "Rewrite this sentence in the past tense.", src, dst
    if kind == 1:
        src, dst = rng.choice(FORMAL)
        return "Rewrite this message in a formal tone.", src, dst
    sentence = rng.choice(SENTENCES)
    if kind == 2:
        return "Convert this text to uppercase.", sentence, sentence.upper()
    if kind == 3:
        return (
            "Reverse the order of the words in this sentence.",
            sentence,
            " ".join(reversed(sentence.split())),
        )
    return (
        "How many words are in this sentence?",
        sentence,
        (f"The sentence has {len(sentence.split())} words."),
    )


def words(rng: random.Random) -> QA:
    kind = rng.randrange(4)
    if kind == 0:
        chosen = rng.sample(WORDS, rng.randint(4, 6))
        return "Sort these words alphabetically.", ", ".join(chosen), ", ".join(sorted(chosen))
    if kind == 1:
        word = rng.choice(WORDS)
        return f"Spell the word {word} backwards.", "", f"{word} backwards is {word[::-1]}."
    if kind == 2:
        word = rng.choice(sorted(ANTONYMS))
        return (
            f"What is the opposite of {word}?",
            "",
            (f"The opposite of {word} is {ANTONYMS[word]}."),
        )
    word = rng.choice(WORDS)
    return (
        f"How many letters are in the word {word}?",
        "",
        (f"The word {word} has {len(word)} letters."),
    )


def numbers(rng: random.Random) -> QA:
    kind = rng.randrange(3)
    if kind == 0:
        values = rng.sample(range(1, 500), rng.randint(4, 7))
        return (
            "Which is the largest number in this list?",
            ", ".join(map(str, values)),
            (f"The largest number is {max(values)}."),
        )
    n = rng.randint(2, 200)
    if kind == 1:
        parity = "even" if n % 2 == 0 else "odd"
        return f"Is {n} even or odd?", "", f"{n} is {parity}."
    divisors = [d for d in range(2, n) if n % d == 0]
    if divisors:
        answer = f"No, {n} is not prime: it is divisible by {divisors[0]}."
        return f"Is {n} a prime number?", "", answer
    return f"Is {n} a prime number?", "", f"Yes, {n} is prime: its only divisors are 1 and {n}."


GENERATORS: list[Callable[[random.Random], QA]] = [
    arithmetic, capital, conversion, definition, how_to, rewrite, words, numbers,
]  # fmt: skip


def unique_questions(rng: random.Random, seen: set[tuple[str, str]]) -> Iterator[QA]:
    """Endless distinct (instruction, context, answer) triples across all generators."""
    while True:
        qa = rng.choice(GENERATORS)(rng)
        if qa[:2] not in seen:
            seen.add(qa[:2])
            yield qa


# --- the files ---


def instruction_rows(questions: Iterator[QA], n: int) -> list[dict[str, str]]:
    rows = []
    for instruction, context, answer in (next(questions) for _ in range(n)):
        row = {"instruction": instruction, "context": context, "response": styled(answer)}
        if not context:
            del row["context"]  # optional: show both shapes
        rows.append(row)
    return rows


def text_rows(questions: Iterator[QA], n: int) -> list[dict[str, str]]:
    rows = []
    for instruction, context, answer in (next(questions) for _ in range(n)):
        prompt = instruction if not context else f"{instruction}\n\n{context}"
        rows.append({"input": f"<USER>{prompt}</USER><ASSISTANT>{answer}</ASSISTANT>"})
    return rows


SYSTEM_PROMPTS = [
    "You are a concise assistant. Answer in one sentence.",
    "You are a friendly tutor who explains things simply.",
    "You are a helpful assistant.",
]


def follow_up(rng: random.Random) -> list[dict[str, str]]:
    """A two-turn exchange whose second question depends on the first answer."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return turns(
            f"What is {a} + {b}?", f"{a} + {b} = {a + b}.",
            "And what is that times 2?", f"{a + b} x 2 = {2 * (a + b)}.",
        )  # fmt: skip
    if kind == 1:
        one, two = rng.sample(sorted(CAPITALS), 2)
        return turns(
            f"What is the capital of {one}?", f"The capital of {one} is {CAPITALS[one]}.",
            f"And the capital of {two}?", f"The capital of {two} is {CAPITALS[two]}.",
        )  # fmt: skip
    km = rng.randint(2, 30)
    return turns(
        f"How many meters are in {km} kilometers?", f"{km} kilometers is {km * 1000} meters.",
        "And how many centimeters is that?", f"{km * 1000} meters is {km * 100000} centimeters.",
    )  # fmt: skip


def turns(*texts: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]


def chat_rows(questions: Iterator[QA], rng: random.Random, n: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(n):
        if i % 3 == 1:
            messages = follow_up(rng)
        else:
            instruction, context, answer = next(questions)
            prompt = instruction if not context else f"{instruction}\n\n{context}"
            messages = turns(prompt, answer)
        if i % 4 == 0:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    seen: set[tuple[str, str]] = set()
    questions = unique_questions(rng, seen)  # train and eval never share a question
    write_jsonl(HERE / "instruction.jsonl", instruction_rows(questions, 200))
    write_jsonl(HERE / "instruction_eval.jsonl", instruction_rows(questions, 20))
    write_jsonl(HERE / "text.jsonl", text_rows(questions, 100))
    write_jsonl(HERE / "chat.jsonl", chat_rows(questions, rng, 100))


if __name__ == "__main__":
    main()
