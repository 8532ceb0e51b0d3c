"""collocate: faster generation from a frozen Hugging Face causal LM with multi-token prediction heads.

    from collocate import Generator
    gen = Generator.from_pretrained("smollm2-135m")
    print(gen.generate("Why is the sky blue?", mode="verify").text)
"""
from .api import Generator
from .decode import DecodeConfig, DecodeResult, DecodeStats

__all__ = ["Generator", "DecodeConfig", "DecodeResult", "DecodeStats"]
