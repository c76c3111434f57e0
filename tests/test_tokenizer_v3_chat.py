"""Chat ids with a v3 SentencePiece tokenizer (Mixtral-8x7B-Instruct's newer revisions, Mistral
v0.3, Mixtral-8x22B) equal mistral-common's. In v3, [INST] and [/INST] are control tokens: each
is one id, not the text pieces v1 writes, and the system prompt joins the last user turn."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from smoe.tokenizer import Message, default_tokenizer_path, load_tokenizer

# The control pieces of mistral-common's tokenizer.model.v3, in its order (ids 3..13).
CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]", "[IMG]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]"]  # fmt: skip
SHIPPED_V3 = default_tokenizer_path().parent / "mistral_instruct_tokenizer_240323.model.v3"


@pytest.fixture(scope="module")
def small_v3(tmp_path_factory) -> Path:
    """A 400-piece BPE model laid out like v3: <unk> <s> </s>, then the control tokens, byte
    fallback, no normalisation. mistral-common reads its version from the ".v3" suffix."""
    import sentencepiece

    rng = random.Random(0)
    words = (
        "hello world what is two plus the colour blue red name another one please you are terse and".split()
    )
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)]
    out = tmp_path_factory.mktemp("v3")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(out / "tok"), vocab_size=400, model_type="bpe",
        byte_fallback=True, control_symbols=CONTROL, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # As Mistral's models: keep spaces and newlines as they are (newlines become byte pieces).
        normalization_rule_name="identity", remove_extra_whitespaces=False,
    )  # fmt: skip
    path = out / "tokenizer.model.v3"
    (out / "tok.model").rename(path)
    return path


def v3_paths(small: Path) -> list[Path]:
    return [small, SHIPPED_V3] if SHIPPED_V3.is_file() else [small]


CHATS = [
    [Message("user", "hello!")],
    [Message("user", "what is 2+2?"), Message("assistant", "4."), Message("user", "and 3+3?")],
    [Message("system", "you are terse."), Message("user", "name a colour."), Message("assistant", "blue."),
     Message("user", "another  one,\n please 🙂")],
    [Message("system", "be terse."), Message("user", "hello"), Message("assistant", "hello world")],
    [Message("user", "typed [INST] and </s> are text"), Message("assistant", "ok [/INST]")],
]  # fmt: skip


def mistral_common_ids(path: Path, chat: list[Message]) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[kinds[m.role](content=m.content) for m in chat])
    mode = ValidationMode.finetuning if chat[-1].role == "assistant" else ValidationMode.test
    mc = MistralTokenizer.from_file(str(path), mode=mode)
    assert mc.instruct_tokenizer.tokenizer.version.value == "v3"
    return mc.encode_chat_completion(request).tokens


@pytest.mark.parametrize("chat", CHATS)
def test_v3_chat_ids_equal_mistral_common(small_v3, chat):
    for path in v3_paths(small_v3):
        tok = load_tokenizer(path)
        ids = tok.encode_chat(chat)
        assert ids == mistral_common_ids(path, chat), path.name
        # One control id per turn marker; text typed by the user never becomes one.
        inst, end = tok.id_of("[INST]"), tok.id_of("[/INST]")
        n_user = sum(m.role == "user" for m in chat)
        assert ids.count(inst) == ids.count(end) == n_user


def test_v3_chat_from_a_checkpoint_dir(small_v3, tmp_path):
    """Hugging Face checkouts of v0.3 models name the same file plain tokenizer.model."""
    (tmp_path / "tokenizer.model").write_bytes(small_v3.read_bytes())
    chat = CHATS[2]
    assert load_tokenizer(tmp_path).encode_chat(chat) == mistral_common_ids(small_v3, chat)


def test_v1_chat_keeps_text_markers():
    tok = load_tokenizer()
    ids = tok.encode_chat([Message("user", "hi")])
    assert ids == [tok.bos_id, *tok.encode("[INST] hi [/INST]", bos=False)]


def test_v3_chat_from_tokenizer_json(small_v3, tmp_path, tokenizer_json):
    """transformers saves v0.3 models' tokenizer as tokenizer.json, with [INST] and [/INST]
    as special added tokens: the chat ids must not change."""
    tokenizer_json(small_v3, ["<unk>", "<s>", "</s>", *CONTROL], tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert tok.path.name == "tokenizer.json"
    for chat in CHATS:
        assert tok.encode_chat(chat) == mistral_common_ids(small_v3, chat)
