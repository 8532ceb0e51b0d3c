"""The public Python API: a backbone, its MTP bundle and the engine that fits them, in one object.

    from collocate import Generator
    gen = Generator.from_pretrained("smollm2-135m")         # the shipped bundle; or heads="runs/my-heads"
    r = gen.generate("Why is the sky blue?", mode="verify", max_new_tokens=128)
    print(r.text, r.stats.tau, r.stats.tok_per_s)
    for piece in gen.stream("Write a haiku about rain.", mode="verify"):
        print(piece, end="", flush=True)

A text prompt goes through the model's chat template (chat=False feeds it raw); a list of token ids is
fed as it is. Options are DecodeConfig's fields (mode, max_new_tokens, threshold, adaptive, candidates,
tree_size, tree_depth, exact, stop, ...), given as keywords or as a DecodeConfig. The streamed pieces join
to the result's text.
"""
from __future__ import annotations

from typing import Iterator

from .decode import DecodeConfig, DecodeError, DecodeResult, Decoder, cut_at_stop


class Generator:
    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer

    @classmethod
    def from_pretrained(cls, model: str, *, heads: str | None = None, device: str = "auto", dtype: str = "auto",
                        engine: str = "auto", **backend_options) -> "Generator":
        """model: a short name (`collocate models`), a hub id, a local folder or a .gguf file. heads: a bundle
        folder or shipped name (default: the bundle shipped for the model, if any). engine: auto | eager |
        fast; backend_options (max_len, graphs, compile) go to the fast backend."""
        from .engine import load_decoder

        return cls(load_decoder(model, heads=heads, device=device, dtype=dtype, engine=engine, **backend_options))

    def encode(self, prompt: str | list[int], *, chat: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if not prompt.strip():
            raise DecodeError("empty prompt: give some text")
        from .data import encode

        return encode(self.tokenizer, prompt, chat=chat)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """A conversation ({"role", "content"} dicts) through the model's chat template, ready for the
        assistant's turn; a tokenizer without a template gets "role: content" lines."""
        if not messages:
            raise DecodeError("messages is empty: give at least one message")
        from .data import encode_messages

        return encode_messages(self.tokenizer, messages)

    def generate(self, prompt: str | list[int], config: DecodeConfig | None = None, *, chat: bool = True,
                 **options) -> DecodeResult:
        return self.decoder.generate(self.encode(prompt, chat=chat), config or DecodeConfig(**options))

    def stream(self, prompt: str | list[int], config: DecodeConfig | None = None, *, chat: bool = True,
               **options) -> Iterator[str]:
        """The answer's text, piece by piece as steps finish; the generator returns the DecodeResult."""
        config = config or DecodeConfig(**options)
        steps = self.decoder.stream(self.encode(prompt, chat=chat), config)
        text = TextStream(self.tokenizer, config.stop)
        while True:
            try:
                piece = text.add(next(steps))
            except StopIteration as done:
                result = done.value
                break
            if piece:
                yield piece
        rest = text.rest()
        if rest:
            yield rest
        return result


class TextStream:
    """New text for new tokens. The whole answer is decoded each time, so a character split across
    tokens comes out whole: text ending in an unfinished character waits for the next tokens, and so
    does a tail that may be the start of a stop string. The pieces join to the final text, which ends
    before the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops, self.tokens, self.printed = tokenizer, tuple(stops), [], ""
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # characters a stop string could still claim

    def text(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stops)

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        safe = text[: max(len(self.printed), len(text) - self.hold)]
        piece, self.printed = safe[len(self.printed):], safe
        return piece

    def rest(self) -> str:
        """What is still held back, at the end."""
        text = self.text()
        piece, self.printed = text[len(self.printed):], text
        return piece
