"""Documents scored given a context -> the text to tokenize and the character spans of it that are scored.

Three ways in: a context and a continuation (--context-field, --context-template), a conversation
rendered with the chat template (--messages-field), and a plain document as the assistant's reply
to a fixed prompt (--chat-wrap). Everything here is text; tokenizing.py turns the character
boundaries into token positions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

from ..config import Config
from ..data.records import Document
from ..errors import EXIT_DATA, EXIT_MODEL, PplError

SENTINEL = "\x00ppl-eval-content\x00"  # stands in for a message's content, to find where the template puts it


class Span(NamedTuple):
    """Characters [start, end) of the text are scored; `turn` is the message they belong to (-1: a continuation)."""

    start: int
    end: int
    turn: int = -1
    role: str | None = None


class Layout(NamedTuple):
    """A conditional document as text: what is tokenized, the scored spans in order, and the texts
    whose words and bytes are the document's (the continuation, the scored turns' contents)."""

    text: str
    spans: tuple[Span, ...]
    counted: tuple[str, ...]
    context_empty: bool = False  # a pair with an empty context (lm-eval then scores after its prefix token)


def pair_layout(doc: Document) -> Layout:
    """lm-evaluation-harness's loglikelihood rule: the context's trailing whitespace moves to the
    continuation, the pair is tokenized whole and split where the context's own tokens end."""
    context, continuation = doc.context or "", doc.text
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    text = context + continuation
    return Layout(text, (Span(len(context), len(text)),), (doc.text,), context_empty=not context)


class ChatRenderer:
    """Renders conversations with the tokenizer's chat template (or --chat-template FILE) and finds
    the characters of each scored turn by rendering the conversation prefix by prefix."""

    def __init__(self, tokenizer, config: Config):
        self.tokenizer = tokenizer
        self.template = chat_template(tokenizer, config)
        self.roles = set(config.score_roles)
        self.wrap_prompt = config.chat_prompt if config.chat_wrap else None

    @property
    def identity(self) -> str:
        """What run.json records of the template: a resumed run must render the same way."""
        return "sha256:" + hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:16]

    def render(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2's errors, raise_exception() in a template, a missing variable
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PplError(f"{where}: the chat template fails to render {len(messages)} message(s): {text}", EXIT_DATA) from None

    def layout(self, doc: Document, text: str | None = None) -> Layout:
        """`text`: a plain document's text as it is to be read (detokenized), for --chat-wrap."""
        if self.wrap_prompt is not None:  # --chat-wrap: only the document's own characters are scored
            messages = [{"role": "user", "content": self.wrap_prompt}, {"role": "assistant", "content": doc.text if text is None else text}]
            rendered, spans, _ = self.turns(messages, doc.where, {1}, content_only=True)
            return Layout(rendered, spans, (doc.text,))
        messages = list(doc.messages)
        wanted = {i for i, m in enumerate(messages) if m["role"] in self.roles and m["content"].strip()}
        text, spans, contents = self.turns(messages, doc.where, wanted, content_only=False)
        return Layout(text, spans, contents)

    def turns(self, messages: list[dict], where: str, wanted: set[int], content_only: bool) -> tuple[str, tuple[Span, ...], tuple[str, ...]]:
        """The whole rendering and, for each wanted message, the characters from its content to the end
        of its turn (the end-of-turn text the template writes after it), or of its content alone."""
        whole = self.render(messages, where)
        spans, contents = [], []
        for i in sorted(wanted):
            before = self.render(messages[:i], where) if i else ""
            through = self.render(messages[: i + 1], where)
            probe = self.render([*messages[:i], {**messages[i], "content": SENTINEL}], where)
            at = probe.find(SENTINEL, len(before))
            if not (whole.startswith(through) and through.startswith(before) and probe.startswith(before)) or at < 0:
                raise PplError(
                    f"{where}: the chat template's rendering of the first {i + 1} messages is not a prefix of the whole"
                    " conversation's, so the turns' tokens cannot be found; give a --chat-template that renders turn by turn",
                    EXIT_DATA,
                )
            header, suffix = probe[len(before) : at], probe[at + len(SENTINEL) :]
            start = len(before) + len(header)
            content_end = len(through) - len(suffix)
            if not (through.startswith(before + header) and through.endswith(suffix) and content_end >= start):
                raise PplError(
                    f"{where}: the chat template writes message {i} differently depending on its content, so its tokens"
                    " cannot be found; give a --chat-template that writes each message's content as it is",
                    EXIT_DATA,
                )
            content = through[start:content_end]
            end = content_end if content_only else len(through)
            if end > start:
                spans.append(Span(start, end, i, messages[i]["role"]))
                contents.append(content)
        return whole, tuple(spans), tuple(contents)


def chat_template(tokenizer, config: Config) -> str:
    """--chat-template FILE, else the tokenizer's own; a tokenizer without one is a clear error."""
    if config.chat_template:
        try:
            return Path(config.chat_template).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise PplError(f"cannot read --chat-template {config.chat_template}: {e.strerror}") from None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise PplError(
            f"the tokenizer of {config.model} has no chat template; give one with --chat-template FILE (a Jinja template)", EXIT_MODEL
        )
    return template
