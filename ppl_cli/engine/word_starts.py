"""Which tokens begin a new word, for --save-words' beginning-of-word correction.

Most tokenizers mark a word's start on its first token, with the space before it: GPT-2's
byte-level BPE writes that space as `Ġ`, SentencePiece as `▁`. The marker is found as minicons
finds it: the token string of a lone space. The word-start tokens are then those whose string
begins with the marker, and the added tokens that strip the space before them, as minicons and
Pimentel and Meister's code count them; a newline or tab token is not one (output/words.py says
how a word after one is scored). A tokenizer without such a marker (WordPiece, character-level,
end-of-word markers) has no defined correction.

Each scored position's distribution is summed over three classes: a word start (W), a word start
or the end-of-sequence token (W + EOS, the boundary after a text's last word), and neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MARKERS = ("Ġ", "▁")  # GPT-2 byte-level BPE, SentencePiece


@dataclass(frozen=True)
class WordStarts:
    marker: str
    starts: np.ndarray  # bool [V]: the tokens that begin a word
    eos_id: int | None

    def classes(self) -> np.ndarray:
        """[V, 3] float32 indicators: W, W + EOS, neither (not W, not EOS)."""
        eos = np.zeros(len(self.starts), dtype=bool)
        if self.eos_id is not None and self.eos_id < len(eos):
            eos[self.eos_id] = True
        return np.stack([self.starts, self.starts | eos, ~(self.starts | eos)], axis=1).astype(np.float32)

    def describe(self) -> dict:
        return {"marker": self.marker, "word_start_tokens": int(self.starts.sum()), "eos_token_id": self.eos_id}


def find_word_starts(tokenizer, vocab_size: int) -> WordStarts | str:
    """The word-start tokens of a tokenizer whose vocabulary has `vocab_size` rows, or the reason
    the correction is not defined for it."""
    try:
        space = tokenizer(" ", add_special_tokens=False).input_ids
    except Exception:
        space = []
    special = set(tokenizer.all_special_ids)
    marker = tokenizer.convert_ids_to_tokens(space[0])[:1] if space else ""
    if marker not in MARKERS or space[0] in special:
        shown = repr(tokenizer.convert_ids_to_tokens(space[0])) if space else "no token"
        return f"its tokenizer marks no word start with a leading space (a space is {shown}, not {' or '.join(MARKERS)})"
    starts = np.zeros(vocab_size, dtype=bool)
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            starts[i] = token.startswith(marker)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_size and i not in special and added.lstrip:
            starts[i] = True
    return WordStarts(marker, starts, tokenizer.eos_token_id)
