"""The tiktoken-based Llama-3 tokenizer against an independent BPE: transformers' conversion of the
same tokenizer.model into a Rust `tokenizers` fast tokenizer."""

import pytest

from jaxtts.tokenizer import BOS_ID, EOS_ID, SPLIT_PATTERN, TextTokenizer, special_token_names, tokenizer_model_path

TEXTS = [
    "Hello from Sesame.",
    "It's 3:45pm — we'll meet at O'Reilly's, isn't it?",
    "Numbers: 1234567 and 3.14159; emails a.b@c.de",
    "  leading and trailing spaces   ",
    "Line one\nLine two\r\n\ttabbed",
    "Unicode: naïve café, Straße, 東京, 😀👍",
    "<|begin_of_text|> looks special but is text",
]


@pytest.fixture(scope="module")
def ours():
    return TextTokenizer()


@pytest.fixture(scope="module")
def reference():
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(tokenizer_model_path()), pattern=SPLIT_PATTERN, extra_special_tokens=special_token_names()
    )
    return PreTrainedTokenizerFast(tokenizer_object=converter.converted())


@pytest.mark.parametrize("text", TEXTS)
def test_matches_independent_bpe(ours, reference, text):
    expected = reference.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ours.encode(text) == expected
    assert ours.decode(ours.encode(text)) == text


def test_segment_framing(ours):
    ids = ours.encode_segment("Hello there.", 3)
    assert ids[0] == BOS_ID == 128000 and ids[-1] == EOS_ID == 128001
    assert ours.decode(ids[1:-1]) == "[3]Hello there."
    assert ours.vocab_size == 128256


def test_known_ids(ours):
    # Llama-3 ids that are stable facts of the vocabulary.
    assert ours.encode("Hello") == [9906]
    assert ours.encode(" world") == [1917]
