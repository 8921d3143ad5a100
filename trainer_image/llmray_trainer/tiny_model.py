"""A tiny random-init Llama with a locally trained tokenizer: a base model with no hub.

Tests, the demo and `llmray init-model DIR --from tiny` use it. The folder it writes is an
ordinary Hugging Face model folder, so every code path (Ray Train, DeepSpeed, LoRA, export,
serving) runs on it exactly as on a real model, only fast:

    config.json  generation_config.json  model.safetensors (fp32)
    tokenizer.json  tokenizer_config.json  chat_template.jinja

Defaults: 656k parameters (vocabulary 1024, hidden 128, 2 layers, 4 heads, 2 KV heads); an
fp32 training step (AdamW) at batch 8 x 128 tokens takes ~50 ms on 2 AVX2 cores, mostly
matmuls at the cores' peak, so a bigger model costs proportionally more. The tokenizer is a
byte-level BPE (any text round-trips) trained with the `tokenizers` library on a built-in
English corpus generated in code, plus every string in `examples/data/*.jsonl` when this
module runs from a source checkout, so the sample datasets tokenize compactly. It carries
llmray's ChatML template (`llmray.chat.DEFAULT_CHAT_TEMPLATE`) with `<|im_end|>` as its eos,
so generation stops at the end of an assistant turn, as with SmolLM2-Instruct.

The same seed and corpus give the same files, byte for byte.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmray.chat import DEFAULT_CHAT_TEMPLATE

log = logging.getLogger(__name__)

# Special tokens, in id order: ids 0-3 are the same in every tiny tokenizer.
BOS_TOKEN = "<|endoftext|>"  # also unk (a byte-level BPE never needs it)
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos: the end of a chat turn
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

MAX_POSITIONS = 2048
# The sample datasets, when running from a source checkout (absent in an installed wheel).
EXAMPLES_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def create_tiny_model(
    out_dir: Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-init `LlamaForCausalLM` and its tokenizer to `out_dir`; returns it.

    `corpus` (lines of text) trains the tokenizer; by default `default_corpus()`. The model's
    vocabulary is the tokenizer's size (at most `vocab_size`; a small corpus gives fewer
    merges). `seed` fixes the weights; the tokenizer depends on the corpus only.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(default_corpus() if corpus is None else corpus, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        # Untied: the simple case for LoRA's modules_to_save and ZeRO-3 partitioning.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # Initialise under a private generator state: same seed, same weights, whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info(
        "tiny model (%d parameters, vocabulary %d) written to %s",
        model.num_parameters(),
        len(tokenizer),
        out_dir,
    )
    return out_dir


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus`, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        unk_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=DEFAULT_CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


# --- the corpus ---


def default_corpus() -> list[str]:
    """The built-in English corpus plus the sample datasets' text, when present."""
    return list(builtin_corpus()) + list(examples_corpus(EXAMPLES_DATA))


def examples_corpus(folder: Path) -> Iterator[str]:
    """Every string value in `folder/*.jsonl` (sorted; unreadable lines skipped)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                yield from _strings(json.loads(line))
            except ValueError:  # a half-written or malformed line: not our business here
                continue


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


_SUBJECTS = [
    "The cat", "A small dog", "My friend", "The teacher", "Our team", "The old man",
    "A young girl", "The student", "Her brother", "The farmer", "A bird", "The doctor",
    "His sister", "The children", "A good model", "The engineer", "My neighbour", "The baker",
]  # fmt: skip
_VERBS = [
    "reads", "writes", "finds", "likes", "carries", "opens", "paints", "sees", "builds",
    "cleans", "counts", "learns", "explains", "answers", "follows", "watches", "brings",
]  # fmt: skip
_OBJECTS = [
    "a book", "the letter", "an apple", "the red door", "a long story", "the map",
    "a new song", "the question", "a cup of tea", "the small box", "the garden",
    "a simple answer", "the river", "a bright lamp", "the window", "a warm coat",
]  # fmt: skip
_PLACES = [
    "in the morning", "at school", "near the river", "every day", "after lunch",
    "in the city", "at home", "on the train", "before dinner", "in the park",
    "during the winter", "at the market", "in the evening", "under the tree",
]  # fmt: skip
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Mexico": "Mexico City",
    "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Chile": "Santiago", "Austria": "Vienna",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Russia": "Moscow", "Australia": "Canberra",
}  # fmt: skip
_TOPICS = [
    "the sea", "a mountain", "the moon", "friendship", "a rainy day", "the forest",
    "music", "a quiet town", "the stars", "autumn leaves", "a cold winter", "the desert",
]  # fmt: skip
_CONCEPTS = {
    "a noun": "a word that names a person, place or thing",
    "a verb": "a word that describes an action or a state",
    "photosynthesis": "the process plants use to turn light, water and air into sugar",
    "gravity": "the force that pulls objects toward each other",
    "a prime number": "a whole number greater than one divisible only by one and itself",
    "an atom": "the smallest unit of a chemical element",
    "a fraction": "a number that expresses part of a whole",
    "evaporation": "the change of a liquid into a gas",
    "a computer": "a machine that follows instructions to process information",
    "democracy": "a system of government in which people choose their leaders",
}  # fmt: skip
_PROSE = [
    "Once upon a time, there was a little village at the edge of a great forest.",
    "The people of the village worked hard, and in the evening they told stories.",
    "Learning a new skill takes time, patience and a lot of practice.",
    "Please answer the question below as clearly and briefly as you can.",
    "Thank you for your help! I hope you have a wonderful day.",
    "Sure, here is a short summary of the text you provided.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "There are seven days in a week and twelve months in a year.",
    "The quick brown fox jumps over the lazy dog.",
    "I am a helpful assistant. How can I help you today?",
]  # fmt: skip


def builtin_corpus(lines: int = 3000) -> Iterator[str]:
    """Deterministic simple English: sentences, facts, arithmetic, instructions, answers."""
    rng = random.Random(20240601)
    yield from _PROSE
    for country, city in _CAPITALS.items():
        yield f"What is the capital of {country}? The capital of {country} is {city}."
    for concept, meaning in _CONCEPTS.items():
        yield f"Explain in one sentence what {concept} is. {concept.capitalize()} is {meaning}."
    for _ in range(lines):
        kind = rng.randrange(6)
        if kind == 0:
            yield (
                f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_PLACES)}."
            )
        elif kind == 1:
            a, b = rng.randrange(100), rng.randrange(100)
            op, value = rng.choice([("+", a + b), ("-", a - b), ("x", a * b)])
            yield f"What is {a} {op} {b}? {a} {op} {b} = {value}."
        elif kind == 2:
            country, city = rng.choice(sorted(_CAPITALS.items()))
            yield f"Which city is the capital of {country}? It is {city}."
        elif kind == 3:
            yield f"Write a short poem about {rng.choice(_TOPICS)}."
        elif kind == 4:
            words = rng.sample(_OBJECTS, 3)
            yield f"Sort these words alphabetically: {', '.join(words)}. {', '.join(sorted(words))}"
        else:
            n = rng.randrange(2, 60)
            yield f"Is {n} even or odd? {n} is {'even' if n % 2 == 0 else 'odd'}."
