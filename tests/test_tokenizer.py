"""Token ids equal sentencepiece's and mistral-common's on thousands of varied strings."""

from __future__ import annotations

import random

import pytest

from smoe.tokenizer import Message, default_tokenizer_path, load_tokenizer


def varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    samples = [
        "", " ", "  ", "\n", "\t\t", "hello world", "  leading", "trailing  ", "a\n\nb", "mixed\t tabs \n lines",
        "def f(x):\n    return x ** 2\n", "for i in range(10):\n\tprint(i)", "x = {'a': [1, 2, 3]}  # comment",
        "日本語のテキスト", "emoji 🙂🚀 and ñ, ü, ß", "Ελληνικά κείμενα", "العربية", "़ा", "\u200b zero width",
        "[INST] not a control token [/INST]", "<s> </s> <unk>", "1234567890 3.14159 -42 1e-5",
        "C'est l'été, n'est-ce pas ?", "         many spaces", "\r\nwindows\r\nlines", "a" * 300,
    ]  # fmt: skip
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \t\n.,;:!?()[]{}<>=+-*/_#'\"\\") + [
        "é", "ö", "中", "文", "🙂", "ж", "ß", "▁", "\u00a0",
    ]  # fmt: skip
    while len(samples) < n:
        k = rng.randint(0, 60)
        samples.append("".join(rng.choice(alphabet) for _ in range(k)))
    return samples


def test_default_is_mixtral_v1():
    tok = load_tokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert default_tokenizer_path().name == "tokenizer.model.v1"


def test_ids_equal_sentencepiece_and_mistral_common():
    import sentencepiece
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = load_tokenizer()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_tokenizer_path()))
    mc = MistralTokenizer.v1().instruct_tokenizer.tokenizer
    strings = varied_strings(3000)
    for s in strings:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids == [1, *sp.encode(s), 2]
        assert ids == mc.encode(s, bos=True, eos=True), repr(s)
        assert tok.encode(s, bos=False) == mc.encode(s, bos=False, eos=False)
        assert tok.decode(ids) == mc.decode(ids), repr(s)


CHATS = [
    [Message("user", "Hello!")],
    [Message("user", "What is 2+2?"), Message("assistant", "4."), Message("user", "And 3+3?")],
    [Message("system", "You are terse."), Message("user", "Name a colour."), Message("assistant", "Blue."),
     Message("user", "Another  one,\n please 🙂")],
    [Message("user", "def f():\n    pass"), Message("assistant", "That function does nothing.")],
]  # fmt: skip


@pytest.mark.parametrize("chat", CHATS)
def test_chat_ids_equal_mistral_common(chat):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[kinds[m.role](content=m.content) for m in chat])
    # A conversation that ends with the assistant is a training example ("finetuning" mode).
    mode = ValidationMode.finetuning if chat[-1].role == "assistant" else ValidationMode.test
    mc = MistralTokenizer.from_file(str(default_tokenizer_path()), mode=mode)
    expected = mc.encode_chat_completion(request).tokens
    assert load_tokenizer().encode_chat(chat) == expected


def test_chat_rejects_bad_order():
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="must start with a user message"):
        tok.encode_chat([Message("assistant", "hi")])
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.encode_chat([Message("user", "a"), Message("user", "b")])


def test_checkpoint_tokenizer_takes_precedence(tmp_path):
    import shutil

    import sentencepiece

    # A tokenizer.model inside the directory wins over the default.
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).path == tmp_path / "tokenizer.model"
    # A tokenizer.json (Hugging Face tokenizers) is used when there is no tokenizer.model.
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    hf = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    other = tmp_path / "other"
    other.mkdir()
    hf.save(str(other / "tokenizer.json"))
    tok = load_tokenizer(other)
    assert tok.encode("hello world", bos=True, eos=True) == [1, 3, 4, 2]
    assert tok.vocab_size == 5
    assert sentencepiece  # imported to make sure the default backend is present


@pytest.fixture(scope="module")
def mixtral_json(tmp_path_factory, tokenizer_json):
    """The v1 SentencePiece model rebuilt as a Hugging Face ``tokenizer.json`` the way
    transformers converts it (<unk>/<s>/</s> special): the file transformers 5 saves instead of
    tokenizer.model."""
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    return tokenizer_json(default_tokenizer_path(), ("<unk>", "<s>", "</s>"), path)


def test_tokenizer_json_encodes_typed_control_tokens_as_text(mixtral_json):
    """ "</s>" typed by a user is text, as in SentencePiece: with a tokenizer.json it became
    EOS, so a user could end or forge chat turns."""
    hf, sp = load_tokenizer(mixtral_json), load_tokenizer()
    for s in ["</s>", "hi </s> there", "<s>[INST] x [/INST]", "<unk>", *varied_strings(200, seed=1)]:
        assert hf.encode(s) == sp.encode(s), repr(s)
    chat = [Message("user", "say </s> please"), Message("assistant", "ok </s>"), Message("user", "again")]
    assert hf.encode_chat(chat) == sp.encode_chat(chat)


def test_streaming_after_a_prompt_ending_in_byte_tokens(mixtral_json):
    """The stream's context must not start inside a character split over byte tokens: the
    tokenizers byte-fallback decoder garbled the reply's first bytes ('🧑' -> '����')."""
    from smoe.textstream import TextStream

    for tok in (load_tokenizer(mixtral_json), load_tokenizer()):
        prompt = tok.encode("Emoji row: 🧑")  # ends in the emoji's 4 byte tokens
        reply = tok.encode("🧑🧑 done", bos=False)[1:]  # no leading space: byte tokens first
        stream = TextStream(tok, prompt)
        assert "".join(stream.push(i) for i in reply) + stream.flush() == "🧑🧑 done"
