"""Incremental detokenisation and stop strings: the text a stream may release after each sampled token.

    detok = IncrementalDetokenizer(tokenizer, prompt_ids)      # the prompt's tail is decoding context
    stops = StopStrings(["\\n\\n", "User:"])
    for tok in generated:
        text, hit = stops.feed(detok.add(tok))                  # release ``text``; stop when ``hit``
    text = stops.feed(detok.flush())[0] + stops.flush()          # at finish: what was held back

Decoding one token at a time is wrong twice over: a byte-level BPE token may hold half of a multi-byte
character (decoded alone it gives U+FFFD), and SentencePiece drops a word's leading space when the word is
first in what it decodes. So :class:`IncrementalDetokenizer` decodes a short window of recent ids (starting
at a character boundary, at least one token before the new ones), releases what the window's text gained,
and holds back a trailing U+FFFD run until the next token completes the character (or ``flush``). The
concatenation of all releases and the flush equals the decode of the generated ids in the context of the
prompt (with no prompt: ``tokenizer.decode(ids, skip_special=True)``). Special tokens give no text.

:class:`StopStrings` holds back a suffix that might begin a stop string, so a stop that spans chunks is
still found, and the released text never contains any part of it. The stop that completes first wins
(the one whose end comes earliest; on a tie the longer one), so the result does not depend on how the
text was chunked.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
#: Prompt ids kept as decoding context: enough for any leading-space rule and a split character.
PROMPT_CONTEXT = 6


class IncrementalDetokenizer:
    """Releases the text of generated ids as soon as it is final. ``tokenizer``: the project's
    :class:`readme_jax.data.tokenizers.Tokenizer`; ``prompt_ids``: the request's prompt (its last few ids
    are context, so the first generated word keeps its leading space)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), *, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids = [int(i) for i in prompt_ids][-PROMPT_CONTEXT:]
        # ``_ids[_boundary:]`` decodes from a character boundary that was last seen clean (no trailing
        # U+FFFD); the window slides to it once the text is clean again.
        self._boundary = len(self._ids)
        self._released = len(self._decode(self._ids).rstrip(REPLACEMENT))

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text newly releasable (possibly "")."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        stable = text.rstrip(REPLACEMENT)
        new = stable[self._released:]
        self._released = max(self._released, len(stable))
        if len(stable) == len(text):        # clean: every byte so far belongs to a whole character
            # Slide the window: it now starts at the previous clean boundary (keeping one token of context
            # before whatever comes next), and everything in it has been released.
            self._ids = self._ids[self._boundary:]
            self._boundary = len(self._ids)
            self._released = len(self._decode(self._ids))
        return new

    def flush(self) -> str:
        """The text still held back (an incomplete trailing character decodes to U+FFFD); call at finish."""
        text = self._decode(self._ids)
        new = text[self._released:]
        self._released = len(text)
        return new


class StopStrings:
    """Finds stop strings in a stream of text chunks. ``feed(chunk) -> (releasable text, stop hit)``: on a
    hit the text before the stop (the stop itself is never released) and True; after a hit every feed
    returns ("", True)."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            raise TypeError("StopStrings takes a list of strings, not a string")
        self.stops = tuple(stops)
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stops!r}")
        self._held = ""
        self.hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        best = None                                   # (end, -length, start)
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best[:2]):
                best = (i + len(s), -len(s), i)
        if best is not None:
            self.hit = True
            self._held = ""
            return buf[:best[2]], True
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if buf.endswith(s[:k])), default=0)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """What is still held back (a suffix that began a stop string which never completed)."""
        held, self._held = ("" if self.hit else self._held), ""
        return held
