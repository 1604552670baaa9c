"""Which GSM8K test questions are behind reasoning-gym's 100 ``gsm_symbolic`` generators?

reasoning-gym does not record it, so each generator's fixed wording is matched against all 1319 test
questions: sample 8 questions from generator ``i``, keep the words common to all of them (the template's
skeleton, without names, items and numbers), and score every test question by IDF-weighted Jaccard
similarity with that skeleton. Prints generator, best test id, best and second-best score and both
questions; the list of best ids is what ``qwha.eval.gsm8k.GSM_SYMBOLIC_TEST_IDS`` pins.

    PYTHONPATH=. python experiments/gsm_symbolic_gsm8k_ids.py
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99

from qwha.eval.gsm8k import GSM_SYMBOLIC_TEST_IDS, load_gsm8k_test


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def main() -> None:
    test = load_gsm8k_test("packaged")
    bags = [words(t["question"]) for t in test]
    df = Counter(w for b in bags for w in b)
    n = len(bags)
    idf = lambda w: math.log(n / (1 + df.get(w, 0)))
    best_ids = []
    for i in range(100):
        module = generators_00_49 if i < 50 else generators_50_99
        gen = getattr(module, f"generate_{i}")
        samples = [gen(random.Random(seed), 1.0)["question"] for seed in range(8)]
        skeleton = set.intersection(*(words(q) for q in samples))
        scores = [sum(idf(w) for w in skeleton & b) / sum(idf(w) for w in skeleton | b) for b in bags]
        order = sorted(range(n), key=lambda j: -scores[j])
        best_ids.append(test[order[0]]["id"])
        print(
            f"{i:3d} -> {test[order[0]]['id']:4d}  score {scores[order[0]]:.3f} (next {scores[order[1]]:.3f})"
            f"\n      gen : {samples[0][:100]}\n      test: {test[order[0]]['question'][:100]}"
        )
    print("unique ids:", len(set(best_ids)))
    print("matches the pinned GSM_SYMBOLIC_TEST_IDS:", tuple(best_ids) == GSM_SYMBOLIC_TEST_IDS)


if __name__ == "__main__":
    main()
