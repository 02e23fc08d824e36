"""The Llama-3 text tokenizer, offline: the `tokenizer.model` shipped in `llama-models`, via tiktoken.

CSM frames each text segment as `<|begin_of_text|>[speaker]text<|end_of_text|>`, exactly as the
original generator's Hugging Face template (`{bos} $A {eos}`) does.
"""

from __future__ import annotations

import functools
from pathlib import Path

from jaxtts.errors import JaxttsError

BOS_ID = 128000
EOS_ID = 128001
NUM_SPECIAL_TOKENS = 256
# Llama-3's pre-tokenisation split (contractions, letters, 1-3 digit groups, punctuation, spaces).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_model_path() -> Path:
    try:
        import llama_models
    except ImportError:
        raise JaxttsError("the Llama-3 tokenizer needs the llama-models package: pip install llama-models") from None
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise JaxttsError(f"{path} is missing; reinstall llama-models")
    return path


def special_token_names() -> list[str]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]


class TextTokenizer:
    def __init__(self, model_path: str | Path | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(model_path) if model_path else tokenizer_model_path()
        ranks = load_tiktoken_bpe(str(path))
        specials = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
        if specials["<|begin_of_text|>"] != BOS_ID:
            raise JaxttsError(f"{path}: not the Llama-3 tokenizer (BOS would be {specials['<|begin_of_text|>']})")
        self._enc = tiktoken.Encoding(
            name=path.stem, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self.vocab_size = len(ranks) + len(specials)

    def encode(self, text: str) -> list[int]:
        """Plain BPE ids; text that looks like a special token is encoded as ordinary text."""
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids))

    def encode_segment(self, text: str, speaker: int) -> list[int]:
        """`[speaker]text` framed with BOS and EOS, as CSM's generator tokenises a segment."""
        return [BOS_ID, *self.encode(f"[{speaker}]{text}"), EOS_ID]


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> TextTokenizer:
    return TextTokenizer()
