"""Tokenizers: one interface (:mod:`.base`), two implementations (:mod:`.bpe`, :mod:`.sentencepiece`) and
the loader that picks one for a path (:mod:`.factory`).

    from readme_jax.data.tokenizers import load_tokenizer
    tok = load_tokenizer(path)          # HF dir, tokenizer.json, tokenizer.model or .gguf
    ids = tok.encode("Hello", bos=True)
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Imports point one way: ``base`` <- ``bpe`` / ``sentencepiece`` <- ``factory`` <- this package.
"""

from readme_jax.data.tokenizers.base import Tokenizer
from readme_jax.data.tokenizers.bpe import BPETokenizer
from readme_jax.data.tokenizers.factory import load_tokenizer, tokenizer_from_gguf
from readme_jax.data.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["Tokenizer", "BPETokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "tokenizer_from_gguf"]
