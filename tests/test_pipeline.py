"""LLMPipeline's text API and the CLI's main command, on tiny checkpoints and on the shipped small model."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from moe_offload import LLMPipeline, MoeOffloadError
from moe_offload.cli import main
from moe_offload.pipeline import DEFAULT_MODEL


@pytest.fixture(scope="module")
def tiny_pipe(checkpoint_factory):
    return LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", MOE_OFFLOAD_RATIO=25)


def test_generate_matches_model_generate(tiny_pipe):
    """pipe.generate is greedy by default and equals transformers' generate on the same model."""
    text = tiny_pipe.generate("def f(x):", max_new_tokens=12, min_new_tokens=12)
    ids = tiny_pipe.tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    out = tiny_pipe.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert text == tiny_pipe.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text


def test_stream_and_callback_give_the_same_text(tiny_pipe):
    whole = tiny_pipe.generate("def f(x):", max_new_tokens=12, min_new_tokens=12)
    pieces = list(tiny_pipe.stream("def f(x):", max_new_tokens=12, min_new_tokens=12))
    seen = []
    called = tiny_pipe.generate("def f(x):", max_new_tokens=12, min_new_tokens=12, streamer=seen.append)
    assert "".join(pieces) == whole == called == "".join(seen)


def test_sampling_is_seeded(tiny_pipe):
    torch.manual_seed(3)
    first = tiny_pipe.generate("def f(x):", max_new_tokens=10, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    again = tiny_pipe.generate("def f(x):", max_new_tokens=10, do_sample=True, temperature=1.5)
    assert first == again


def test_stream_reraises_generation_errors(tiny_pipe):
    with pytest.raises(ValueError):
        list(tiny_pipe.stream("def f(x):", max_new_tokens=4, do_sample=True, temperature=-1.0))


def test_cli_generate_streams_prompt_and_continuation(checkpoint_factory, capsys):
    assert main(["generate", "--model", checkpoint_factory("olmoe"), "--ratio", "37", "--device", "cpu",
                 "--max-new-tokens", "6", "def f(x):"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and len(out) > len("def f(x):\n")


def test_stream_closed_early_waits_for_its_worker(tiny_pipe):
    """A caller that stops reading (the CLI under `| head`) leaves no generation running behind it: the
    interpreter could otherwise exit under it."""
    before = threading.active_count()
    pieces = tiny_pipe.stream("def f(x):", max_new_tokens=30, min_new_tokens=30)
    next(pieces)
    pieces.close()
    assert threading.active_count() == before


def test_cli_generate_into_a_closed_pipe_stops_quietly(checkpoint_factory):
    """`moe-offload generate ... | head`: the reader has gone; exit as a SIGPIPE'd tool would, no traceback."""
    command = [sys.executable, "-m", "moe_offload.cli", "generate", "--model", checkpoint_factory("olmoe"),
               "--device", "cpu", "--max-new-tokens", "4", "def f(x):"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before anything is written: the first write finds no reader
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGPIPE and "Traceback" not in err and "terminate" not in err


def test_cli_info_reports_bytes_per_ratio(checkpoint_factory, capsys):
    path = checkpoint_factory("mixtral")
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == 2 and {l["experts"] for l in info["layers"]} == {8}
    assert info["layers"][0]["expert_bytes"] == 3 * 24 * 32 * 4  # gate, up, down of [24, 32] fp32
    rows = info["device_bytes_by_ratio"]
    assert rows["100"]["expert_bytes"] == info["expert_bytes_total"] and rows["0"]["expert_bytes"] == 0
    assert rows["37"]["expert_bytes"] == 2 * 3 * info["layers"][0]["expert_bytes"]  # floor(8 * .37 + .5) = 3


def test_shipped_model_fits_the_brief():
    """The shipped model: <= 40 MB, >= 16 routed experts per layer, top-k >= 2, >= 4 MoE layers, a tokenizer."""
    total = sum(os.path.getsize(os.path.join(DEFAULT_MODEL, f)) for f in os.listdir(DEFAULT_MODEL))
    assert total <= 40 * 10**6
    with open(os.path.join(DEFAULT_MODEL, "config.json")) as handle:
        config = json.load(handle)
    assert config["num_experts_per_tok"] >= 2
    experts = config.get("num_experts") or config.get("num_local_experts")
    assert experts >= 16 and config["num_hidden_layers"] >= 4
    assert os.path.isfile(os.path.join(DEFAULT_MODEL, "tokenizer.json"))


def test_main_command_prints_code_from_the_shipped_model(capsys):
    """README's main command, shortened: no --model, so the shipped model; its continuation looks like Python."""
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "24", "def fibonacci(n):"]) == 0
    out = capsys.readouterr().out
    continuation = out[len("def fibonacci(n):"):]
    assert continuation.strip(), "no continuation"
    assert "\n    " in continuation, f"no indented code line in {continuation!r}"


def test_generate_after_close_is_a_clear_error():
    pipe = LLMPipeline(None, "cpu")
    pipe.close()
    with pytest.raises(MoeOffloadError, match="closed"):
        pipe.generate("def f(x):", max_new_tokens=2)


class _StopAfter:
    """A transformers-protocol streamer whose put returns True (stop) at the `after`-th new token."""

    def __init__(self, after: int):
        self.after, self.tokens, self.prompt, self.ended = after, [], None, False

    def put(self, value):
        if self.prompt is None:
            self.prompt = value
            return None
        self.tokens += value.view(-1).tolist()
        return len(self.tokens) >= self.after

    def end(self):
        self.ended = True


@pytest.mark.parametrize("sampling", [False, True], ids=["static-decoder", "transformers-generate"])
def test_streamer_returning_true_stops_generation(tiny_pipe, sampling):
    """Both generation paths stop right after the token whose put returned True, and return what was streamed."""
    ids = tiny_pipe.tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    kwargs = dict(do_sample=True, temperature=1.0) if sampling else {}
    torch.manual_seed(0)
    whole = tiny_pipe.generate_tokens(ids, max_new_tokens=10, min_new_tokens=10, **kwargs)
    streamer = _StopAfter(3)
    torch.manual_seed(0)
    new = tiny_pipe.generate_tokens(ids, streamer=streamer, max_new_tokens=10, min_new_tokens=10, **kwargs)
    assert new.tolist() == streamer.tokens == whole[:3].tolist()
    assert streamer.ended
