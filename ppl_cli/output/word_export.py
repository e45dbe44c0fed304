"""--save-words: every word's surprisal to Parquet, words/part-NNNNNNNNNNNN.parquet, as --save-tokens writes tokens.

Each part holds whole documents (written before their rows go to documents.jsonl, cut back to the
finished documents when a run resumes, joined by merge: token_export's parts). A word's row:
the document's `index` and `id`, `word_index`, `word`, its characters `start` and `end` in the
text, `space_before` (the text between the word before and it: the words and these rebuild the
text, line breaks included), `surprisal` (nats, with the beginning-of-word correction unless it is off) and
`surprisal_bits`, `tokens` (how many it spans), `uncorrected_surprisal` (the plain sum over its
tokens) and `shared_token`. The document's row gains word_surprisal_sum and scored_words (its
words with a surprisal) and word_perplexity_corrected = exp(word_surprisal_sum / scored_words).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import LN2, perplexity
from .token_export import write_part
from .words import assign, listed_spans, surprisals, word_spans

WORDS_DIR = "words"


@dataclass(frozen=True)
class WordExport:
    """How a run's documents become word rows: the word-start tokens (None: no correction) and where parts go."""

    folder: Path
    starts: np.ndarray | None  # [V] bool
    head: int  # tokens before a document's text (BOS: 1)

    def document(self, item, values: dict[str, np.ndarray], tail: dict[str, float] | None) -> tuple[dict, dict]:
        """A document's word table and what its row gains. `values`: its scored tokens' kept values
        (positions 1..n-1), `tail`: the word-start classes after its last token."""
        doc = item.document
        spans = listed_spans(doc.words) if doc.words is not None else word_spans(doc.text)
        words = assign(doc.text, spans, item.offsets)
        classes = None
        if self.starts is not None:
            classes = {"bow": values["bow"], "not_bow": values["not_bow"], "end": tail["bow_eos"]}
        s = surprisals(words, self.head, values["nll"], classes, item.ids, self.starts)
        scored = ~np.isnan(s.corrected)
        total, count = float(s.corrected[scored].sum()), int(scored.sum())
        table = {
            "index": np.full(len(spans), item.index, dtype=np.int64),
            "id": [doc.id] * len(spans),
            "word_index": np.arange(len(spans), dtype=np.int32),
            "word": [doc.text[a:b] for a, b in spans],
            "start": np.array([a for a, _ in spans], dtype=np.int32),
            "end": np.array([b for _, b in spans], dtype=np.int32),
            "space_before": [doc.text[(spans[k - 1][1] if k else 0) : a] for k, (a, _) in enumerate(spans)],
            "surprisal": s.corrected,
            "surprisal_bits": s.corrected / LN2,
            "tokens": s.tokens.astype(np.int32),
            "uncorrected_surprisal": s.uncorrected,
            "shared_token": words.shared,
        }
        row = {"word_surprisal_sum": total, "scored_words": count, "word_perplexity_corrected": perplexity(total, count)}
        return table, row

    def write(self, tables: list[dict]) -> None:
        write_part(self.folder, tables, WORDS_DIR)
