"""Which candidates the reader reads for a training question: the document sets it will meet when served.

Each question draws one setting (seeded, so a resumed run draws the same):

* ``all``: every candidate, as in an all-ten evaluation or a large ``top_k``;
* ``top_k``: the reranker's top 2 or 3, as ``/answer`` serves them;
* ``gold``: the supporting paragraphs plus 0-4 random distractors;
* ``missing``: one supporting paragraph dropped (or, a third of the time, both) from a small set, so the
  reader learns what to answer when the evidence is partly or wholly missing, as it is when the reranker errs.

The target is always the gold answer: as in Fusion-in-Decoder training, the reader learns to use what
evidence there is and, without it, to answer in the dataset's style.
"""

from __future__ import annotations

import random

from grerank.qa_data import Example

SETTINGS = {"all": 0.3, "top_k": 0.3, "gold": 0.25, "missing": 0.15}


def reading_set(example: Example, ranked: list[int], rng: random.Random) -> list[int]:
    """Candidate indices in candidate order, for a setting drawn at random; ``ranked`` is the reranker's
    order of them."""
    n = len(example.passages)
    gold = [i for i, s in enumerate(example.supporting) if s]
    others = [i for i in range(n) if i not in gold]
    setting = rng.choices(list(SETTINGS), weights=list(SETTINGS.values()))[0]
    if not gold or not others:  # unlabelled or all-gold questions: only the label-free settings apply
        setting = "all" if setting in ("gold", "missing") else setting
    if setting == "all":
        chosen = list(range(n))
    elif setting == "top_k":
        chosen = ranked[: rng.choice((2, 3))]
    elif setting == "gold":
        chosen = gold + rng.sample(others, min(len(others), rng.randint(0, 4)))
    else:
        kept = [] if rng.random() < 1 / 3 else rng.sample(gold, len(gold) - 1)
        chosen = kept + rng.sample(others, min(len(others), rng.randint(1, 3)))
    return sorted(chosen)
