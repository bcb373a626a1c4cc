"""Write two small local lm-eval-harness tasks over the embedded corpus's validation text
(docs/lm-eval/): `nagjax_cloze` (log-likelihood: the next word among 4) and `nagjax_next_words`
(generate_until: greedy continuation of a sentence start). Offline, deterministic:

    python scripts/lm_eval_tasks.py          # writes docs/lm-eval/{cloze,next_words}.jsonl
    python scripts/lm_eval_tasks.py --compare OUT_B1 OUT_B4   # two lm_eval --log_samples outputs
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nagjax.data.corpus import embedded_documents

OUT = Path(__file__).resolve().parents[1] / "docs" / "lm-eval"


def sentences() -> list[list[str]]:
    out = []
    for doc in embedded_documents("validation"):
        for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")):
            words = s.split()
            if 14 <= len(words) <= 40 and all(w.isascii() for w in words):
                out.append(words)
    return out


def main(n: int = 40) -> None:
    rng = random.Random(0)
    picked = rng.sample(sentences(), 2 * n)
    cloze, gen = [], []
    vocab = sorted({w for s in picked for w in s})
    for words in picked[:n]:
        k = rng.randint(6, len(words) - 2)
        answer = words[k]
        distractors = rng.sample([w for w in vocab if w != answer], 3)
        choices = [answer] + distractors
        rng.shuffle(choices)
        cloze.append({"context": " ".join(words[:k]), "choices": choices, "label": choices.index(answer)})
    for words in picked[n:]:
        k = rng.randint(6, len(words) - 4)
        gen.append({"context": " ".join(words[:k]), "target": " ".join(words[k:k + 3])})
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("cloze", cloze), ("next_words", gen)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {OUT}/cloze.jsonl ({len(cloze)}), {OUT}/next_words.jsonl ({len(gen)})")


def compare(a: str, b: str) -> None:
    """Are two `lm_eval --log_samples` runs' answers the same (e.g. --batch_size 1 and 4)?"""
    def load(root, task):
        f = sorted(Path(root).glob(f"*/samples_{task}_*.jsonl"))[-1]
        return {r["doc_id"]: r for r in map(json.loads, f.open())}

    g1, g2 = load(a, "nagjax_next_words"), load(b, "nagjax_next_words")
    same = sum(g1[k]["filtered_resps"] == g2[k]["filtered_resps"] for k in g1)
    print(f"nagjax_next_words: {same}/{len(g1)} greedy continuations identical")
    for k in sorted(g1)[:3]:
        print(f"  ...{g1[k]['doc']['context'][-40:]!r} -> {g1[k]['filtered_resps'][0]!r} | "
              f"{g2[k]['filtered_resps'][0]!r}")
    c1, c2 = load(a, "nagjax_cloze"), load(b, "nagjax_cloze")
    diff = max(abs(float(x[0]) - float(y[0])) for k in c1
               for x, y in zip(c1[k]["filtered_resps"], c2[k]["filtered_resps"]))
    print(f"nagjax_cloze: max |log-likelihood difference| = {diff:.2e} over {len(c1)} x 4 choices")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare(sys.argv[2], sys.argv[3])
    else:
        main()
