"""``smoe generate`` and ``smoe chat`` end to end on small saved checkpoints, one of them written
by transformers (whose own greedy generate is the expected output)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import pytest
import torch

import smoe
from smoe.cli.main import main
from smoe.config import ModelConfig
from smoe.generate import GenerationConfig, Generator


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    smoe.save_model(smoe.build_model(ModelConfig.preset("tiny", n_layers=2, max_seq_len=256), seed=1), d)
    return d


def test_generate_matches_transformers_greedy(make_hf, capsys):
    """A transformers-written checkpoint on the real vocabulary: the CLI's greedy text is the
    decoded text of transformers' own greedy generate."""
    directory, ref = make_hf(vocab_size=32000)
    tok = smoe.load_tokenizer(directory)
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = tok.decode(ids + out[0, len(ids) :].tolist())[len(tok.decode(ids)) :]
    rc = main(
        [
            "generate",
            "--model",
            str(directory),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out == expected + "\n"
    assert "tokens in" in captured.err


def test_generate_subprocess_seeded(tiny_dir):
    cmd = [sys.executable, "-m", "smoe", "generate", "--model", str(tiny_dir), "--prompt", "Hello there"]
    cmd += [
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--dtype",
        "float32",
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    # A seeded run repeats, in another process too.
    gen = Generator(smoe.load_model(tiny_dir), smoe.load_tokenizer(tiny_dir), cpu_layout=True)
    cfg = GenerationConfig(max_new_tokens=6, seed=3, temperature=0.9, top_k=50, top_p=0.9)
    assert run.stdout == gen.generate(["Hello there"], cfg)[0].text + "\n"


def test_chat_is_multi_turn(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\nAnd then?\n/exit\n"))
    args = [
        "chat",
        "--model",
        str(tiny_dir),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--system",
        "Be brief.",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    replies = [line.removeprefix("> ") for line in out.splitlines() if line.strip() not in ("", ">")]
    assert len(replies) == 2
    # Rebuild the second turn's prompt from the first reply: the CLI must have sent exactly it.
    tok = smoe.load_tokenizer(tiny_dir)
    gen = Generator(smoe.load_model(tiny_dir), tok, cpu_layout=True)
    cfg = GenerationConfig(max_new_tokens=5, top_p=0.9)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    first = gen.generate([tok.encode_chat(msgs)], cfg)[0].text.strip()
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = gen.generate([tok.encode_chat(msgs)], cfg)[0].text.strip()
    assert replies == [first, second]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-new-tokens", "300"], "max_seq_len=256"),
    ],
)
def test_generate_errors_are_clear(tiny_dir, capsys, extra, match):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", "x", *extra])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_small_vocab_checkpoint_rejected(make_hf, capsys):
    directory, _ = make_hf()  # vocab 97 < the tokenizer's 32000
    assert main(["generate", "--model", str(directory), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size is 97" in err and "tokenizer.model or tokenizer.json" in err


def test_padded_vocab_checkpoint_generates(make_hf, capsys):
    """A vocabulary padded past the tokenizer's 32000 pieces: the padding ids are never sampled
    (they crashed the detokeniser), even when they score highest."""
    directory, ref = make_hf(vocab_size=32768)
    with torch.no_grad():  # padding row 32000 + i scores 10x real id i
        ref.lm_head.weight[32000:] = 10 * ref.lm_head.weight[:768]
    ref.save_pretrained(directory)
    args = [
        "generate",
        "--model",
        str(directory),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
    ]
    assert main([*args, "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "4 tokens in" in captured.err


def test_consolidated_checkpoint(tiny_dir, tmp_path, capsys):
    """The same weights saved in Mistral's consolidated format generate the same text."""
    smoe.save_model(smoe.load_model(tiny_dir), tmp_path / "cons", fmt="consolidated")
    args = ["--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0", "--ignore-eos"]
    assert main(["generate", "--model", str(tiny_dir), *args]) == 0
    hf_out = capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "cons"), *args]) == 0
    assert capsys.readouterr().out == hf_out and len(hf_out) > 1


@pytest.mark.slow
def test_ctrl_c_ends_cleanly(tiny_dir):
    cmd = [sys.executable, "-m", "smoe", "generate", "--model", str(tiny_dir), "--prompt", "Count:"]
    cmd += ["--max-new-tokens", "240", "--ignore-eos"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler; CI may run us that way. Give the child the default
    # disposition, as an interactive terminal would.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    first = proc.stdout.read(1)  # streaming has started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert first and proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "chat", "analyze", "demo", "train"])
def test_device_is_checked_where_parsed(command, capsys, tmp_path):
    """A device this torch cannot use ends in argparse's one-line error, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = {"generate": ["--model", str(tmp_path), "--prompt", "hi"], "chat": ["--model", str(tmp_path)],
            "analyze": ["--model", str(tmp_path), "--data", str(tmp_path)], "demo": [],
            "train": ["--data", str(tmp_path), "--out", str(tmp_path / "r")]}[command]  # fmt: skip
    for device, message in (("cuda", "has no CUDA device"), ("gpu0", "not a torch device")):
        with pytest.raises(SystemExit) as e:
            main([command, *args, "--device", device])
        assert e.value.code == 2 and message in capsys.readouterr().err
