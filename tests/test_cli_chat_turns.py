"""``smoe chat`` edges: Ctrl-C during a reply, a conversation that outgrows the context, empty
lines and Ctrl-D. Each later turn's prompt is rebuilt with the tokenizer's chat format."""

from __future__ import annotations

import io
import sys

import pytest

import smoe
from smoe.cli import generate_cmds
from smoe.cli.main import main
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator

ARGS = ["--max-new-tokens", "5", "--temperature", "0"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat")
    smoe.save_model(smoe.build_model(ModelConfig.preset("tiny", n_layers=2, max_seq_len=64), seed=1), d)
    return d


def _record_prompts(monkeypatch, interrupt_call: int | None = None) -> list[list[int]]:
    """Record every prompt the chat sends; raise KeyboardInterrupt after the first delta of call
    ``interrupt_call`` (0-based), as Ctrl-C in the middle of a reply would."""
    prompts: list[list[int]] = []
    real = Generator.stream

    def stream(self, prompt, cfg, results=None):
        prompts.append(list(prompt))
        for i, delta in enumerate(real(self, prompt, cfg, results)):
            if len(prompts) - 1 == interrupt_call and i == 1:
                raise KeyboardInterrupt
            yield delta

    monkeypatch.setattr(generate_cmds.Generator, "stream", stream)
    return prompts


def test_ctrl_c_drops_the_turn_and_the_next_turn_works(tiny_dir, monkeypatch, capsys):
    prompts = _record_prompts(monkeypatch, interrupt_call=0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n\nAnd then?\n"))  # then EOF (Ctrl-D)
    assert main(["chat", "--model", str(tiny_dir), *ARGS, "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert "reply interrupted; turn dropped" in captured.err and "Traceback" not in captured.err
    # The partial reply's line is ended on stdout, so the next "> " prompt starts a line.
    assert captured.out.split("> ")[1].endswith("\n")
    tok = smoe.load_tokenizer(tiny_dir)
    # The empty line sent nothing; the interrupted turn is gone from the conversation.
    assert prompts == [tok.encode_chat([{"role": "user", "content": m}]) for m in ("Hi!", "And then?")]
    gen = Generator(smoe.load_model(tiny_dir), tok, cpu_layout=True)
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    assert gen.generate([prompts[1]], cfg)[0].text.strip() in captured.out


def test_conversation_past_the_context_is_refused_clearly(tiny_dir, monkeypatch, capsys):
    prompts = _record_prompts(monkeypatch)
    long = " ".join(["word"] * 80)  # > 64 tokens alone
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hi!\n{long}\nOk.\n/exit\n"))
    assert main(["chat", "--model", str(tiny_dir), *ARGS]) == 0
    err = capsys.readouterr().err
    assert "max_seq_len=64" in err or "context of 64" in err
    assert "truncate=True" not in err  # chat has no such option: do not advise it
    assert "Traceback" not in err
    assert len(prompts) == 2 and prompts[1][: len(prompts[0])] == prompts[0]  # the long turn was dropped
