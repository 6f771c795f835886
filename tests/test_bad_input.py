"""Bad input: every user mistake ends as ONE line `moe-offload: error: ...` on stderr, exit status 2, no traceback.

The CLI is driven in-process through `moe_offload.cli.main` (fast); one subprocess run of
`python -m moe_offload.cli` proves the real exit status and stderr. The same corrupt checkpoints must make
the Python API raise MoeOffloadError, never another exception type.

Each case asserts that the message names the specific problem, so a check that fires for the wrong reason
(e.g. "not valid JSON" where an overlap was planted) fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from moe_offload import LLMPipeline, MoeOffloadError
from moe_offload.cli import main

PREFIX = "moe-offload: error:"
ARCH = "qwen3_moe"  # one safetensors file, per-expert keys, 2 MoE layers of 8 experts
WEIGHTS = "model.safetensors"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- damaging a checkpoint ---------------------------------------------------------------------------------------

def _read_safetensors(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as handle:
        raw = handle.read()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_safetensors(path: str, header: dict, data: bytes, pad_to: int = 0) -> None:
    text = json.dumps(header).encode()
    text += b" " * max(0, pad_to - len(text))  # the format allows trailing spaces in the header
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + data)


def _edit_header(root: str, edit) -> None:
    """Rewrite the header of root/model.safetensors through `edit(header, data_size)`, keeping the data bytes."""
    path = os.path.join(root, WEIGHTS)
    header, data = _read_safetensors(path)
    with open(path, "rb") as handle:
        (old_length,) = struct.unpack("<Q", handle.read(8))
    edit(header, len(data))
    _write_safetensors(path, header, data, pad_to=old_length)


def _edit_config(root: str, **changes) -> None:
    path = os.path.join(root, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(changes)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def _two_tensors_same_size(header: dict) -> tuple[str, str]:
    a, b = "model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.0.up_proj.weight"
    assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    return a, b


def _truncate_mid_data(root):
    path = os.path.join(root, WEIGHTS)
    header, data = _read_safetensors(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size - len(data) // 2)  # cut in the middle of the data section


def _shorter_than_8_bytes(root):
    with open(os.path.join(root, WEIGHTS), "wb") as handle:
        handle.write(b"\x10\x00\x00")


def _header_length_past_end(root):
    path = os.path.join(root, WEIGHTS)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.write(struct.pack("<Q", size))  # 8 + size > size


def _header_not_json(root):
    with open(os.path.join(root, WEIGHTS), "r+b") as handle:
        handle.seek(8)
        handle.write(b"#")  # '{"lm_head...' becomes '#"lm_head...': same length, not JSON


def _offsets_out_of_range(root):
    def edit(header, data_size):
        entry = header["model.norm.weight"]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [data_size - (end - begin) + 64, data_size + 64]  # right size, past the end

    _edit_header(root, edit)


def _overlapping_tensors(root):
    def edit(header, data_size):
        a, b = _two_tensors_same_size(header)
        header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now reads a's bytes; sizes unchanged

    _edit_header(root, edit)


def _overlap_behind_empty_tensor(root):
    """Overlap that a check comparing only neighbours in offset order misses: A contains C, an empty tensor
    sits between them in sorted order."""
    def edit(header, data_size):
        begin, end = header["lm_head.weight"]["data_offsets"]
        header["extra.empty"] = {"dtype": "F32", "shape": [0], "data_offsets": [begin + 8, begin + 8]}
        header["extra.inner"] = {"dtype": "F32", "shape": [2], "data_offsets": [begin + 16, begin + 24]}

    _edit_header(root, edit)


def _offsets_not_matching_shape(root):
    def edit(header, data_size):
        entry = header["model.norm.weight"]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [begin, end - 4]  # one float32 short of shape [32]

    _edit_header(root, edit)


def _negative_dims(root):
    def edit(header, data_size):
        header["model.norm.weight"]["shape"] = [-4, -8]  # product 32: the byte count still "matches"

    _edit_header(root, edit)


def _trailing_bytes(root):
    with open(os.path.join(root, WEIGHTS), "ab") as handle:
        handle.write(b"\0" * 64)  # data section longer than the tensors it holds


def _index_missing_shard(root):
    header, _ = _read_safetensors(os.path.join(root, WEIGHTS))
    weight_map = {name: WEIGHTS for name in header if name != "__metadata__"}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    with open(os.path.join(root, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)


def _index_shard_not_a_string(root):
    with open(os.path.join(root, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {}, "weight_map": {"lm_head.weight": 5}}, handle)


def _no_config(root):
    os.remove(os.path.join(root, "config.json"))


def _no_safetensors(root):
    os.remove(os.path.join(root, WEIGHTS))


def _wrong_expert_shape(root):
    _edit_config(root, moe_intermediate_size=24)  # checkpoint experts are [16, 32]


def _dense_tensor_wrong_shape(root):
    _edit_config(root, vocab_size=321)  # embed_tokens and lm_head are [320, 32] in the file


def _not_a_model(root):
    _edit_config(root, model_type="not_a_model")


def _dense_llama(root, with_tokenizer: bool):
    import transformers
    from tiny_models import save_tokenizer

    shutil.rmtree(root)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    if with_tokenizer:
        save_tokenizer(root)


def _gpt_oss(root):
    """GPT-OSS (experts with biases, transposed) whose down_proj biases are missing from the file."""
    import transformers
    from tiny_models import save_tokenizer

    shutil.rmtree(root)
    config = transformers.GptOssConfig(vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root)
    save_tokenizer(root)
    from safetensors.torch import load_file, save_file

    path = os.path.join(root, "model.safetensors")
    state = {name: tensor for name, tensor in load_file(path).items() if not name.endswith("down_proj_bias")}
    save_file(state, path, metadata={"format": "pt"})


# name -> (damage(root) or None where the fixture makes the path, words the error must contain, where it is
#          caught: "headers" = by Checkpoint(), so header-only `moe-offload info` rejects it too; "load" = only
#          when the model is built (generate, API))
CHECKPOINT_CASES = {
    "missing_path": (None, ["not found"], "headers"),
    "path_is_file": (None, ["not a directory"], "headers"),
    "no_config_json": (_no_config, ["no config.json"], "headers"),
    "no_safetensors": (_no_safetensors, ["no .safetensors"], "headers"),
    "truncated_mid_data": (_truncate_mid_data, ["truncated", "out of range"], "headers"),
    "shorter_than_8_bytes": (_shorter_than_8_bytes, ["truncated", "no header"], "headers"),
    "header_length_past_end": (_header_length_past_end, ["header length", "past the end"], "headers"),
    "header_not_json": (_header_not_json, ["header", "not valid JSON"], "headers"),
    "offsets_out_of_range": (_offsets_out_of_range, ["model.norm.weight", "out of range"], "headers"),
    "overlapping_tensors": (_overlapping_tensors, ["overlap", "experts.0.gate_proj", "experts.0.up_proj"], "headers"),
    "offsets_not_matching_shape": (_offsets_not_matching_shape, ["model.norm.weight", "do not match", "shape"],
                                   "headers"),
    "index_missing_shard": (_index_missing_shard, ["missing shard", "model-00002-of-00002"], "headers"),
    "wrong_expert_shape": (_wrong_expert_shape, ["experts.0.gate_proj.weight", "[16, 32]", "expects [24, 32]"],
                           "load"),
    "dense_tensor_wrong_shape": (_dense_tensor_wrong_shape, ["has shape [320, 32]", "expects [321, 32]"], "load"),
    "unsupported_architecture": (_not_a_model, ["unsupported architecture", "not_a_model"], "load"),
    "gpt_oss_without_expert_biases": (_gpt_oss, ["lacks experts.down_proj_bias", "layer 0"], "load"),
    "dense_model": (lambda root: _dense_llama(root, with_tokenizer=True), ["'llama' is a dense model"], "headers"),
    # Corruption that an earlier checkpoint.py let through (the library's own loader then raised).
    "overlap_behind_empty_tensor": (_overlap_behind_empty_tensor, ["overlap", "lm_head.weight", "extra.inner"],
                                    "headers"),
    "negative_dims": (_negative_dims, ["corrupt", "model.norm.weight"], "headers"),
    "trailing_bytes_after_data": (_trailing_bytes, ["corrupt", "model.safetensors"], "headers"),
    "index_shard_not_a_string": (_index_shard_not_a_string, ["corrupt", "model.safetensors.index.json"], "headers"),
}
def _cases(front_end: str):
    """front_end: "generate", "api" or "info"."""
    for name, (_, _, scope) in CHECKPOINT_CASES.items():
        if front_end == "info" and scope != "headers":
            continue
        yield pytest.param(name, id=name)


@pytest.fixture(scope="module")
def good_checkpoint(checkpoint_factory):
    return checkpoint_factory(ARCH)


@pytest.fixture(scope="module")
def bad_checkpoint(good_checkpoint, tmp_path_factory):
    """bad_checkpoint(name) -> path of a damaged copy of the tiny checkpoint (built once per module)."""
    made: dict[str, str] = {}
    base = tmp_path_factory.mktemp("bad")

    def make(name: str) -> str:
        if name not in made:
            damage = CHECKPOINT_CASES[name][0]
            root = str(base / f"ckpt{len(made)}")  # no case name in the path: it could satisfy a word check
            if name == "missing_path":
                made[name] = root  # never created
            elif name == "path_is_file":
                made[name] = os.path.join(good_checkpoint, WEIGHTS)
            else:
                shutil.copytree(good_checkpoint, root)
                damage(root)
                made[name] = root
        return made[name]

    return make


# -- checking the CLI's answer ----------------------------------------------------------------------------------

def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the damaged checkpoint printed
    rc = main(argv)  # a non-MoeOffloadError escapes here: the test fails with that exception's traceback
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_words(message: str, words: list[str], path: str | None = None) -> None:
    """Every word in the message, not counting the checkpoint path (whose folder name must not satisfy it)."""
    text = message.replace(path, "<path>") if path else message
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in {message!r}"


def _assert_one_error_line(rc: int, err: str, words: list[str], path: str | None = None) -> str:
    """Exit 2 and stderr exactly `moe-offload: error: <one line naming the problem>`."""
    assert rc == 2, f"exit status {rc}, stderr {err!r}"
    assert "Traceback" not in err
    assert err.startswith(PREFIX), f"stderr does not start with {PREFIX!r}: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, f"more than one line: {err!r}"
    _assert_words(err, words, path)
    return err


@pytest.mark.parametrize("name", list(_cases("generate")))
def test_generate_rejects_bad_checkpoint(name, bad_checkpoint, capsys):
    path = bad_checkpoint(name)
    rc, out, err = _cli(capsys, ["generate", "hello", "--device", "cpu", "--model", path])
    _assert_one_error_line(rc, err, CHECKPOINT_CASES[name][1], path)
    assert out == ""


@pytest.mark.parametrize("name", list(_cases("info")))
def test_info_rejects_bad_checkpoint(name, bad_checkpoint, capsys):
    path = bad_checkpoint(name)
    rc, out, err = _cli(capsys, ["info", path])
    _assert_one_error_line(rc, err, CHECKPOINT_CASES[name][1], path)
    assert out == ""


@pytest.mark.parametrize("name", list(_cases("api")))
def test_api_raises_moe_offload_error(name, bad_checkpoint):
    with pytest.raises(MoeOffloadError) as caught:  # any other exception type fails the test
        LLMPipeline(path := bad_checkpoint(name), "cpu")
    message = str(caught.value)
    assert "\n" not in message
    _assert_words(message, CHECKPOINT_CASES[name][1], path)


@pytest.fixture(scope="module")
def dense_without_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m"))
    _dense_llama(path, with_tokenizer=False)
    return path


def test_dense_model_without_tokenizer_api(dense_without_tokenizer):
    """`save_pretrained` alone (no tokenizer): the API needs no tokenizer, so it must say 'dense'."""
    with pytest.raises(MoeOffloadError) as caught:
        LLMPipeline(dense_without_tokenizer, "cpu")
    _assert_words(str(caught.value), ["is a dense model", "no routed experts"], dense_without_tokenizer)


def test_dense_model_without_tokenizer_generate(dense_without_tokenizer, capsys):
    rc, _, err = _cli(capsys, ["generate", "hello", "--device", "cpu", "--model", dense_without_tokenizer])
    _assert_one_error_line(rc, err, ["is a dense model"], dense_without_tokenizer)


# -- bad flags and properties (a good checkpoint; nothing is loaded before the error) -----------------------------

def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


FLAG_CASES = {
    "ratio_101": (lambda tmp: ["--ratio", "101"], ["MOE_OFFLOAD_RATIO", "101"]),
    "ratio_negative": (lambda tmp: ["--ratio", "-1"], ["MOE_OFFLOAD_RATIO", "-1"]),
    "ratio_not_a_number": (lambda tmp: ["--ratio", "abc"], ["MOE_OFFLOAD_RATIO", "abc"]),
    "ratio_fraction": (lambda tmp: ["--ratio", "37.5"], ["MOE_OFFLOAD_RATIO", "37.5"]),
    "ratio_101_in_config_file": (
        lambda tmp: ["-lc", _write(tmp, "r.json", '{"MOE_OFFLOAD_RATIO": 101}')], ["MOE_OFFLOAD_RATIO"]),
    "unknown_property_in_file": (
        lambda tmp: ["-lc", _write(tmp, "u.json", '{"MOE_OFFLOAD_RATIOO": 50}')],
        ["unknown property", "MOE_OFFLOAD_RATIOO"]),
    "unknown_property_inline": (lambda tmp: ["-lc", '{"MOE_PREFETCH": "on"}'],
                                ["unknown property", "MOE_PREFETCH"]),
    "config_file_missing": (lambda tmp: ["-lc", str(tmp / "nope.json")], ["config file not found", "nope.json"]),
    "config_file_invalid_json": (lambda tmp: ["-lc", _write(tmp, "bad.json", '{"MOE_OFFLOAD_RATIO": 5,')],
                                 ["not valid JSON"]),
    "config_inline_invalid_json": (lambda tmp: ["-lc", '{"MOE_OFFLOAD_RATIO": }'], ["not valid JSON"]),
    "config_file_not_an_object": (lambda tmp: ["-lc", _write(tmp, "list.json", "[25]")], ["JSON object"]),
    "host_cache_bad": (lambda tmp: ["--host-cache", "lots"], ["MOE_HOST_CACHE", "lots"]),
    "diagnostic_as_property": (lambda tmp: ["-lc", '{"MOE_IO": "pread"}'], ["MOE_IO", "diagnostic", "environment"]),
    "dtype_bad": (lambda tmp: ["--dtype", "int4"], ["MOE_DTYPE", "int4"]),
    "max_new_tokens_0": (lambda tmp: ["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    "max_new_tokens_not_int": (lambda tmp: ["--max-new-tokens", "many"], ["invalid int value", "many"]),
    "unknown_flag": (lambda tmp: ["--bogus"], ["unrecognized arguments", "--bogus"]),
    "bad_device": (lambda tmp: ["--device", "tpu"], ["device", "tpu"]),
    # issue 19 part 5: each of these was a traceback or was silently accepted
    "host_cache_overflow": (lambda tmp: ["--host-cache", "1e400"], ["MOE_HOST_CACHE", "1e400"]),
    "top_k_negative": (lambda tmp: ["--top-k", "-1"], ["--top-k", "-1"]),
    "seed_too_big": (lambda tmp: ["--seed", str(2**70)], ["--seed", str(2**70)]),
    "temperature_negative": (lambda tmp: ["--temperature", "-1"], ["--temperature", "-1"]),
    "temperature_nan": (lambda tmp: ["--temperature", "nan"], ["--temperature", "nan"]),
    "top_p_0": (lambda tmp: ["--temperature", "1", "--top-p", "0"], ["--top-p", "(0, 1]", "0"]),
    "top_p_2": (lambda tmp: ["--top-p", "2"], ["--top-p", "2"]),
    "config_inline_list": (lambda tmp: ["-lc", "[37]"], ["JSON object", "[37]"]),
    "prompt_and_prompt_file": (lambda tmp: ["-f", _write(tmp, "p.txt", "x")], ["not both"]),
}


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_generate_rejects_bad_flag(name, good_checkpoint, tmp_path, capsys):
    extra, words = FLAG_CASES[name]
    argv = ["generate", "hello", "--model", good_checkpoint] + extra(tmp_path)
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    rc, out, err = _cli(capsys, argv)
    _assert_one_error_line(rc, err, words)
    assert out == ""


def test_generate_rejects_a_bad_diagnostic_in_the_environment(good_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("MOE_IO", "mmap")  # removed: slowest everywhere, and SIGBUS when the file shrinks
    rc, out, err = _cli(capsys, ["generate", "hello", "--model", good_checkpoint, "--device", "cpu"])
    _assert_one_error_line(rc, err, ["environment variable", "MOE_IO", "odirect, pread", "mmap"])
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_cuda_without_gpu(good_checkpoint, capsys):
    rc, _, err = _cli(capsys, ["generate", "hello", "--device", "cuda", "--model", good_checkpoint])
    _assert_one_error_line(rc, err, ["cuda", "no CUDA GPU"])


def test_generate_missing_prompt(good_checkpoint, capsys):
    rc, _, err = _cli(capsys, ["generate", "--device", "cpu", "--model", good_checkpoint])
    _assert_one_error_line(rc, err, ["required", "prompt"])


def test_info_missing_path(capsys):
    rc, _, err = _cli(capsys, ["info"])
    _assert_one_error_line(rc, err, ["required", "path"])


def test_no_command(capsys):
    rc, _, err = _cli(capsys, [])
    _assert_one_error_line(rc, err, ["required"])


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.mark.parametrize("case", [
    "wrong_expert_shape",
    "empty_prompt",
    "dense_tensor_wrong_shape",
])
def test_generate_error_in_a_terminal_is_its_own_last_line(case, good_checkpoint, bad_checkpoint, capsys,
                                                           monkeypatch):
    """With stderr a terminal the progress bars are on; the error must still start a line of its own and be the
    last thing the terminal shows (bars erased, not glued to the message)."""
    if case == "empty_prompt":
        argv, words = ["generate", "", "--model", good_checkpoint], ["empty prompt"]
    else:
        argv, words = ["generate", "hello", "--model", bad_checkpoint(case)], CHECKPOINT_CASES[case][1]
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, out, err = _cli(capsys, argv + ["--device", "cpu"])
    assert rc == 2 and "Traceback" not in err
    segments = [seg.strip() for seg in re.split(r"[\r\n]", _ANSI.sub("", err))]
    shown = [seg for seg in segments if seg]
    assert shown and shown[-1].startswith(PREFIX), f"last visible line is not the error: {err!r}"
    _assert_words(shown[-1], words, argv[3])


def test_failed_load_leaves_no_progress_bar_open(bad_checkpoint, capsys):
    """The same bug through the API: a load that fails inside the bar loop must close its bar."""
    from tqdm.auto import tqdm

    before = len(tqdm._instances)
    with pytest.raises(MoeOffloadError) as caught:
        LLMPipeline(bad_checkpoint("dense_tensor_wrong_shape"), "cpu", progress=True)
    open_bars = len(tqdm._instances) - before
    del caught
    assert open_bars == 0, "the 'dense weights' bar is still open after the load failed"


def test_generate_empty_prompt(good_checkpoint, capsys):
    rc, _, err = _cli(capsys, ["generate", "", "--device", "cpu", "--model", good_checkpoint])
    _assert_one_error_line(rc, err, ["empty prompt"])


def test_good_input_still_works(good_checkpoint, capsys):
    """The harness itself: a valid command exits 0 and prints the prompt and its continuation."""
    rc, out, err = _cli(capsys, ["generate", "hello", "--device", "cpu", "--model", good_checkpoint,
                                 "--max-new-tokens", "2", "--ratio", "25", "--host-cache", "0"])
    assert rc == 0, err
    assert out.startswith("hello") and PREFIX not in err


# -- the Python API for bad properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("props, words", [
    ({"MOE_OFFLOAD_RATIO": 101}, ["MOE_OFFLOAD_RATIO"]),
    ({"MOE_OFFLOAD_RATIO": True}, ["MOE_OFFLOAD_RATIO"]),
    ({"MOE_OFFLOAD_RATIO": 37.5}, ["MOE_OFFLOAD_RATIO"]),
    ({"MOE_HOST_CACHE": -1}, ["MOE_HOST_CACHE"]),
    ({"moe_offload_ratioo": 5}, ["unknown property"]),
    ({"config": {"MOE_IO": "aio"}}, ["MOE_IO"]),
    ({"config": "/nonexistent/props.json"}, ["config file not found"]),
], ids=["ratio101", "ratio_bool", "ratio_fraction", "host_cache_negative", "unknown", "config_dict",
        "config_missing"])
def test_api_rejects_bad_properties(good_checkpoint, props, words):
    with pytest.raises(MoeOffloadError) as caught:
        LLMPipeline(good_checkpoint, "cpu", **props)
    _assert_words(str(caught.value), words, good_checkpoint)


# -- the real process ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "overlapping_tensors",
    "unsupported_architecture",
])
def test_subprocess_exit_code_and_single_stderr_line(name, bad_checkpoint):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moe_offload.cli", "generate", "hello", "--device", "cpu",
                           "--model", bad_checkpoint(name)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "\r" not in proc.stderr, f"stderr is not one line: {proc.stderr!r}"
    assert re.match(re.escape(PREFIX) + " ", lines[0])
    _assert_words(lines[0], CHECKPOINT_CASES[name][1], bad_checkpoint(name))
