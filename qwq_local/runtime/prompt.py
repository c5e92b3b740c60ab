"""Prompt text -> token ids as the reference tokenizer makes them, with control tokens taken only
from the template's own text.

Two rules llama.cpp's `llama_tokenize` does not follow on its own:
- Normalization. Hugging Face tokenizers apply the tokenizer.json normalizer (QwQ's: NFC) to the
  text between added tokens before the BPE; llama.cpp applies none, so decomposed text
  ("Cafe\\u0301") gets other ids. The normalizer comes from the GGUF key
  `tokenizer.qwq_local.normalizer` that `convert` writes (constants.GGUF_NORMALIZER_KEY), or NFC for
  Qwen2-family files without it.
- Special text in messages. llama.cpp turns every control token's text into its id when
  parse_special is on, and user-defined (tag) tokens such as `</think>` even when it is off. The
  encoder splits the text at the special-token occurrences itself (longest text first, as
  llama.cpp's tokenizer partitions), emits the ids of those from the template, and reads those
  from message text (the `protected` spans, see chat.template.render_prompt_spans) as plain text:
  each is cut where its first letter begins, so no piece contains a whole special text and the
  pieces decode back to it. Without protected spans the fragments are exactly llama.cpp's, so the
  ids equal whole-prompt `llama_tokenize(parse_special=True)` of the normalized text.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

from .. import constants
from ..errors import UnsupportedModelError


def normalizer_of(meta_value: str | None, *, tokenizer_pre: str | None, source: str) -> str:
    """The normalizer to apply for a GGUF: its recorded one, NFC for Qwen2-family files without
    the key, else none. An unknown recorded value is refused (the ids would differ silently)."""
    if meta_value is None:
        return constants.QWEN2_NORMALIZER if tokenizer_pre == constants.GGUF_TOKENIZER_PRE else "none"
    if meta_value not in constants.NORMALIZERS:
        raise UnsupportedModelError(
            f"{source}: {constants.GGUF_NORMALIZER_KEY} is {meta_value!r}; qwq-local reproduces only "
            f"{', '.join(constants.NORMALIZERS)}; convert the checkpoint again with this qwq-local")
    return meta_value


class PromptEncoder:
    """Tokenizes prompts for one loaded model (see the module docstring)."""

    def __init__(self, model, *, normalizer: str) -> None:
        self._model = model
        self.normalizer = normalizer
        self._ids: dict[str, int] | None = None

    @property
    def specials(self) -> dict[str, int]:
        """Text -> id of every token llama.cpp's tokenizer matches as a whole in text (control,
        user-defined and unknown types); read from the vocabulary once."""
        if self._ids is None:
            from ..backend import binding as backend

            lib = backend.llama()
            vocab = self._model.vocab
            wanted = lib.LLAMA_TOKEN_ATTR_CONTROL | lib.LLAMA_TOKEN_ATTR_USER_DEFINED | lib.LLAMA_TOKEN_ATTR_UNKNOWN
            ids: dict[str, int] = {}
            for tid in range(self._model.n_vocab):
                if lib.llama_vocab_get_attr(vocab, tid) & wanted:
                    text = self._model.token_bytes(tid).decode("utf-8", errors="replace")
                    if text:
                        ids.setdefault(text, tid)
            self._ids = ids
        return self._ids

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalizer == "NFC" else text

    def encode(self, text: str, *, protected: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of `text`; special texts become their ids except in `protected` spans."""
        from ..chat.template import specials_pattern

        ids = self.specials
        pattern = specials_pattern(tuple(ids))
        plain_starts = {start for start, _ in protected}
        tokens: list[int] = []
        piece_start = 0
        if pattern is not None:
            for found in pattern.finditer(text):
                start, end = found.span()
                if start in plain_starts:
                    cut = start + _cut_point(found.group(0))
                    tokens += self._plain(text[piece_start:cut])
                    piece_start = cut
                    continue
                tokens += self._plain(text[piece_start:start])
                tokens.append(ids[found.group(0)])
                piece_start = end
        tokens += self._plain(text[piece_start:])
        return tokens

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        return self._model.tokenize(self.normalize(text), add_special=False, parse_special=False)


def _cut_point(special: str) -> int:
    """Where to cut a special text read as plain text: before its first letter or digit (the
    boundary Qwen2's pre-tokenizer puts there anyway: `</` `think` `>`), else after one character."""
    for i, ch in enumerate(special):
        if ch.isalnum():
            return i if i > 0 else 1
    return 1
