"""LLMPipeline.generate keeps OpenVINO GenAI's promises (issue 19, part 4), and checks its inputs at the door (part 5).

Each promise here was broken before generation.py: a list of prompts gave one completion, a GenerationConfig was
ignored, a streamer callback returning True did not stop, the checkpoint's generation_config.json was overridden,
there were no timings, and LLMPipeline(path) wanted CUDA. References are transformers' own generate on the same
model (greedy and seeded sampling) or the same call made another way.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil

import pytest
import torch
from transformers import GenerationConfig as HFGenerationConfig

from moe_offload import GenerationConfig, LLMPipeline, MoeOffloadError
from moe_offload.decoding import unsupported_reason
from moe_offload.pipeline import resolve_device

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def pipe(checkpoint_factory):
    return LLMPipeline(checkpoint_factory("qwen3_moe"))  # no device: the automatic choice


def _ids(pipe, text=PROMPT):
    return pipe.tokenizer(text, return_tensors="pt")["input_ids"]


def _reference(pipe, text=PROMPT, **kwargs):
    """transformers' generate on the same model: the text of its new tokens."""
    ids = _ids(pipe, text)
    out = pipe.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pipe.tokenizer.eos_token_id,
                              **kwargs)
    return pipe.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_device_defaults_to_the_cli_choice(pipe):
    assert inspect.signature(LLMPipeline).parameters["device"].default is None
    assert pipe.device == resolve_device(None)  # cpu here: "cuda" used to fail on a machine without a GPU


def test_a_list_of_prompts_gives_a_list_equal_to_one_by_one(pipe):
    prompts = (PROMPT, "import os")  # a tuple is a list too
    together = pipe.generate(prompts, max_new_tokens=3)
    assert isinstance(together, list)
    assert together == [pipe.generate(p, max_new_tokens=3) for p in prompts]


def test_a_conversation_goes_through_the_chat_template(pipe):
    """A list of messages is laid out by the tokenizer's chat template (its own special tokens, none added)."""
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(MoeOffloadError, match="no chat template"):
        pipe.generate(messages)
    pipe.tokenizer.chat_template = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
    try:
        ids = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        tokens = pipe.generate_tokens(ids, max_new_tokens=3, do_sample=False)
        assert pipe.generate(messages, max_new_tokens=3) == pipe.tokenizer.decode(tokens, skip_special_tokens=True)
        assert pipe.perf_metrics.get_num_input_tokens() == ids.shape[1]
    finally:
        pipe.tokenizer.chat_template = None


@pytest.mark.parametrize("config", [GenerationConfig(max_new_tokens=4, ignore_eos=True),
                                    HFGenerationConfig(max_new_tokens=4, min_new_tokens=4),
                                    {"max_new_tokens": 4, "min_new_tokens": 4}], ids=["ours", "transformers", "dict"])
def test_generation_config_is_honoured(pipe, config):
    text = pipe.generate(PROMPT, config)
    assert pipe.perf_metrics.get_num_generated_tokens() == 4
    assert text == _reference(pipe, max_new_tokens=4, min_new_tokens=4, do_sample=False)


def test_sampling_settings_and_seed_are_honoured(pipe):
    """do_sample, temperature, top_k, top_p reach the sampler (transformers' generate with the same seed draws the
    same tokens), rng_seed repeats a draw, and the global generator is left as it was."""
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8, rng_seed=11)
    state = torch.get_rng_state()
    text = pipe.generate(PROMPT, config)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(11)
    assert text == _reference(pipe, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=8)
    assert pipe.generate(PROMPT, config) == text
    assert pipe.generate(PROMPT, config, rng_seed=12) != text or pipe.generate(PROMPT, config, rng_seed=13) != text


def test_keyword_arguments_win_over_the_config(pipe):
    pipe.generate(PROMPT, GenerationConfig(max_new_tokens=9, ignore_eos=True), max_new_tokens=3)
    assert pipe.perf_metrics.get_num_generated_tokens() == 3


def test_a_streamer_callback_returning_true_stops(pipe):
    pieces = []

    def stop_after_two(text):
        pieces.append(text)
        return len(pieces) >= 2

    text = pipe.generate(PROMPT, max_new_tokens=40, ignore_eos=True, streamer=stop_after_two)
    made = pipe.perf_metrics.get_num_generated_tokens()
    assert made < 40 and text == "".join(pieces)
    assert text == _reference(pipe, max_new_tokens=made, min_new_tokens=made, do_sample=False)


def test_a_streamer_callback_returning_nothing_goes_on(pipe):
    pieces = []
    text = pipe.generate(PROMPT, max_new_tokens=12, ignore_eos=True, streamer=pieces.append)
    assert pipe.perf_metrics.get_num_generated_tokens() == 12 and text == "".join(pieces)


def test_perf_metrics_after_a_call(pipe):
    assert pipe.perf_metrics.get_load_time() > 0
    pipe.generate([PROMPT, "import os"], max_new_tokens=6, ignore_eos=True)
    metrics = pipe.perf_metrics
    assert metrics.get_num_generated_tokens() == 12
    assert metrics.get_num_input_tokens() == _ids(pipe).shape[1] + _ids(pipe, "import os").shape[1]
    ttft, tpot, throughput = metrics.get_ttft(), metrics.get_tpot(), metrics.get_throughput()
    assert 0 < ttft.mean < metrics.get_generate_duration().mean and tpot.mean > 0
    assert throughput.mean == pytest.approx(sum(1000 / p.tpot_ms for p in metrics.prompts) / 2)
    assert metrics.as_dict()["generated_tokens"] == 12


def test_stream_stopped_early_cancels_its_generation(pipe):
    pieces = pipe.stream(PROMPT, max_new_tokens=200, ignore_eos=True)
    next(pieces)
    pieces.close()
    assert pipe.perf_metrics.get_num_generated_tokens() < 200


def _stop_in(text: str) -> str:
    """A stop string of several printable characters (whole ones, no partial UTF-8) that the greedy continuation
    makes early on, not at its very start."""
    for start in range(2, len(text) - 6):
        stop = text[start:start + 5]
        if stop.isprintable() and stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
            return stop
    pytest.fail(f"no stop string to pick in {text!r}")


STOP_TOKENS = 24


@pytest.fixture(scope="module")
def full_text(pipe):
    return pipe.generate(PROMPT, max_new_tokens=STOP_TOKENS, ignore_eos=True)


def test_stop_strings_cut_the_text_and_stop(pipe, full_text):
    stop = _stop_in(full_text)
    end = full_text.index(stop)
    kwargs = dict(max_new_tokens=STOP_TOKENS, ignore_eos=True, stop_strings=[stop, "never made \u2603"])
    assert pipe.generate(PROMPT, **kwargs) == full_text[:end]
    assert pipe.perf_metrics.get_num_generated_tokens() < STOP_TOKENS
    pieces = []
    assert pipe.generate(PROMPT, streamer=pieces.append, **kwargs) == full_text[:end] == "".join(pieces)
    assert "".join(pipe.stream(PROMPT, **kwargs)) == full_text[:end]
    assert pipe.generate(PROMPT, **kwargs, include_stop_str_in_output=True) == full_text[:end + len(stop)]


def test_text_that_may_begin_a_stop_string_is_held_back(pipe):
    """Pieces as transformers' TextStreamer hands them over: none shows text past the stop, held text that turns
    out not to be a stop is let through, and the end flushes it."""
    from moe_offload.streaming import TextCallback

    shown = []
    sink = TextCallback(pipe.tokenizer, shown.append, stop_strings=("<stop>",))
    for piece in ["ab<", "s", "x <st", "o"]:
        sink.on_finalized_text(piece)
    assert shown == ["ab", "<sx "] and not sink.stopped
    sink.on_finalized_text("p>tail")
    assert shown == ["ab", "<sx "] and sink.stopped and sink.text == "ab<sx "
    held = TextCallback(pipe.tokenizer, shown.append, stop_strings=("<stop>",))
    held.on_finalized_text("end <st")
    held.on_finalized_text("", stream_end=True)
    assert held.text == "end <st" and shown[-1] == "<st"


def test_stop_strings_beside_a_token_streamer(pipe, full_text):
    full, stop = full_text, _stop_in(full_text)

    class Tokens:
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value)

        def end(self):
            pass

    tokens = Tokens()
    assert pipe.generate(PROMPT, streamer=tokens, max_new_tokens=STOP_TOKENS, ignore_eos=True,
                         stop_strings=stop) == full[:full.index(stop)]
    assert len(tokens.seen) - 1 == pipe.perf_metrics.get_num_generated_tokens() < STOP_TOKENS  # prompt, tokens


def test_stream_reraises_a_failure_of_its_worker(pipe, monkeypatch):
    """Arguments are checked by the call; a failure inside generation comes out of the iteration instead."""
    import threading

    def fail(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(pipe, "generate_tokens", fail)
    before = threading.active_count()
    pieces = pipe.stream(PROMPT, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="kernel failed"):
        list(pieces)
    assert threading.active_count() == before


@pytest.fixture(scope="module")
def sampling_checkpoint(checkpoint_factory, tmp_path_factory):
    """The tiny checkpoint whose generation_config.json samples, at temperature 0.5 with top_k 3, 5 new tokens."""
    path = str(tmp_path_factory.mktemp("sampling-checkpoint"))
    source = checkpoint_factory("qwen3_moe")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), path)
    with open(os.path.join(path, "generation_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(do_sample=True, temperature=0.5, top_k=3, max_new_tokens=5)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return LLMPipeline(path, "cpu")


def test_the_checkpoints_generation_config_supplies_defaults(sampling_checkpoint):
    pipe = sampling_checkpoint
    assert pipe.get_generation_config().to_dict() == {"do_sample": True, "temperature": 0.5, "top_k": 3,
                                                      "max_new_tokens": 5}
    text = pipe.generate(PROMPT, rng_seed=4)
    torch.manual_seed(4)
    assert text == _reference(pipe, do_sample=True, temperature=0.5, top_k=3, top_p=1.0, max_new_tokens=5)
    assert pipe.perf_metrics.get_num_generated_tokens() <= 5


def test_explicit_arguments_win_and_greedy_stays_on_the_static_decoder(sampling_checkpoint):
    pipe = sampling_checkpoint
    text = pipe.generate(PROMPT, do_sample=False, max_new_tokens=7, min_new_tokens=7)
    assert text == _reference(pipe, do_sample=False, max_new_tokens=7, min_new_tokens=7)
    # the benchmark's way in stays greedy, and a greedy request is not sent to transformers for the file's sampling
    args = pipe._generate_kwargs(PROMPT, 4, do_sample=False, min_new_tokens=4)
    assert args["do_sample"] is False and args["max_new_tokens"] == 4
    assert unsupported_reason(pipe.model, {k: v for k, v in args.items() if k != "input_ids"}) is None


def test_set_generation_config_replaces_the_defaults(sampling_checkpoint):
    pipe = sampling_checkpoint
    before = pipe.get_generation_config()
    try:
        pipe.set_generation_config(HFGenerationConfig(max_new_tokens=2, min_new_tokens=2))
        pipe.generate(PROMPT)
        assert pipe.perf_metrics.get_num_generated_tokens() == 2
    finally:
        pipe.set_generation_config(before)


def test_max_length_counts_the_prompt(pipe):
    length = _ids(pipe).shape[1]
    pipe.generate(PROMPT, max_length=length + 3, ignore_eos=True)
    assert pipe.perf_metrics.get_num_generated_tokens() == 3
    with pytest.raises(MoeOffloadError, match="max_length"):
        pipe.generate(PROMPT, max_length=length)


def test_none_means_not_given(pipe):
    """A keyword left at None does not override the layer below (here the config's 3 tokens)."""
    pipe.generate(PROMPT, GenerationConfig(max_new_tokens=3, ignore_eos=True), max_new_tokens=None, top_k=None)
    assert pipe.perf_metrics.get_num_generated_tokens() == 3


# -- the door: one rule (a wrong type or a value out of range is a MoeOffloadError, itself a ValueError, naming the
# argument and what it got), checked before anything is generated ------------------------------------------------

BAD_CALLS = {
    "inputs_none": ((None,), {}, ["inputs must be", "None"]),
    "inputs_empty_list": (([],), {}, ["empty list"]),
    "inputs_list_of_ints": (([1, 2],), {}, ["inputs must be"]),
    "inputs_message_without_content": (([{"role": "user"}],), {}, ["conversation", "content"]),
    "max_new_tokens_fraction": ((PROMPT,), {"max_new_tokens": 2.5}, ["max_new_tokens", "integer", "2.5"]),
    "max_new_tokens_0_greedy": ((PROMPT,), {"max_new_tokens": 0}, ["max_new_tokens", ">= 1", "0"]),
    "max_new_tokens_0_sampling": ((PROMPT,), {"max_new_tokens": 0, "do_sample": True}, ["max_new_tokens", ">= 1"]),
    "max_new_tokens_negative": ((PROMPT,), {"max_new_tokens": -1}, ["max_new_tokens", "-1"]),
    "max_new_tokens_bool": ((PROMPT,), {"max_new_tokens": True}, ["max_new_tokens", "True"]),
    "temperature_negative": ((PROMPT,), {"temperature": -1.0, "do_sample": True}, ["temperature", "-1.0"]),
    "temperature_nan": ((PROMPT,), {"temperature": math.nan}, ["temperature", "nan"]),
    "temperature_0_sampling": ((PROMPT,), {"temperature": 0, "do_sample": True}, ["temperature", "> 0"]),
    "top_p_0": ((PROMPT,), {"top_p": 0}, ["top_p", "(0, 1]"]),
    "top_p_2": ((PROMPT,), {"top_p": 2}, ["top_p", "2"]),
    "top_k_negative": ((PROMPT,), {"top_k": -1}, ["top_k", "-1"]),
    "seed_too_big": ((PROMPT,), {"rng_seed": 2**70}, ["rng_seed", str(2**70)]),
    "do_sample_string": ((PROMPT,), {"do_sample": "yes"}, ["do_sample", "True or False"]),
    "unknown_argument": ((PROMPT,), {"max_tokens": 3}, ["unknown generation argument", "max_tokens"]),
    "config_wrong_type": ((PROMPT, "greedy"), {}, ["generation_config", "str"]),
    "config_dict_unknown": ((PROMPT, {"beams": 2}), {}, ["unknown generation argument", "beams"]),
    "transformers_config_beams": ((PROMPT, HFGenerationConfig(num_beams=2)), {}, ["num_beams", "not apply"]),
    "streamer_wrong_type": ((PROMPT,), {"streamer": 5}, ["streamer", "int"]),
    "stop_string_empty": ((PROMPT,), {"stop_strings": [""]}, ["stop_strings", "non-empty"]),
    "stop_strings_not_strings": ((PROMPT,), {"stop_strings": ["a", 3]}, ["stop_strings", "3"]),
    "streamer_with_a_list": (([PROMPT, PROMPT],), {"streamer": print}, ["streamer", "one prompt"]),
    "empty_prompt": (("",), {}, ["empty prompt"]),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_generate_rejects_bad_input(pipe, name):
    args, kwargs, words = BAD_CALLS[name]
    with pytest.raises(MoeOffloadError) as caught:
        pipe.generate(*args, **kwargs)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_a_reassigned_field_is_checked_at_the_call(pipe):
    config = GenerationConfig(max_new_tokens=3)
    config.max_new_tokens = 2.5
    with pytest.raises(MoeOffloadError, match="max_new_tokens"):
        pipe.generate(PROMPT, config)
    with pytest.raises(AttributeError):
        config.max_new_token = 8  # misspelt: never read, so refused


def test_a_callback_returning_a_non_bool_is_an_error(pipe):
    with pytest.raises(MoeOffloadError, match="streamer callback"):
        pipe.generate(PROMPT, max_new_tokens=20, ignore_eos=True, streamer=lambda text: "stop")


def test_stream_checks_before_it_starts(pipe):
    with pytest.raises(MoeOffloadError, match="top_k"):
        pipe.stream(PROMPT, top_k=-1)  # raised by the call, not at the first next()
    with pytest.raises(MoeOffloadError, match="one prompt"):
        pipe.stream([PROMPT, PROMPT])


@pytest.mark.parametrize("config, words", [
    ([1, 2], ["config must be", "list"]),
    (5, ["config must be", "int"]),
    ({1: 2}, ["property names are strings"]),
    ("[37]", ["JSON object"]),
    ({"MOE_HOST_CACHE": "1e400"}, ["MOE_HOST_CACHE", "1e400"]),
], ids=["list", "int", "non_string_key", "inline_json_list", "host_cache_overflow"])
def test_pipeline_rejects_a_bad_config(checkpoint_factory, config, words):
    with pytest.raises(MoeOffloadError) as caught:
        LLMPipeline(checkpoint_factory("qwen3_moe"), "cpu", config=config)
    for word in words:
        assert word in str(caught.value)


def test_docs_list_every_generation_field():
    """docs/api.md's table of generation arguments is generation.CHECKS, field for field."""
    from pathlib import Path

    from test_docs import table_after

    from moe_offload.generation import CHECKS

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    rows = table_after(text, ("field", "accepts", "default"))
    assert [row[0].strip("`") for row in rows] == list(CHECKS)
