"""`moe-offload quantize` on bad input: one line `moe-offload: error: ...`, exit status 2, and nothing
written (the output folder's parent is as it was)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_offload.cli import main

PREFIX = "moe-offload: error:"


def _quantize(capsys, tmp_path, *argv: str) -> str:
    """Run `quantize`; check exit 2, one error line, nothing new under tmp_path; return the line."""
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    rc = main(["quantize", *argv])
    out, err = capsys.readouterr()
    assert rc == 2, f"exit status {rc}, stderr {err!r}"
    assert out == "" and "Traceback" not in err
    assert err.startswith(PREFIX) and err.endswith("\n") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == before, "something was left behind"
    return err


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("dense"))
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized_model(checkpoint_factory, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("quantized") / "q")
    assert main(["quantize", checkpoint_factory("qwen3_moe"), "-o", out, "--bits", "4", "--group-size", "8"]) == 0
    return out


@pytest.mark.parametrize("bits", ["3", "16", "four"])
def test_bits_other_than_4_or_8(checkpoint_factory, tmp_path, capsys, bits):
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "-o", str(tmp_path / "q"), "--bits", bits)
    assert "--bits" in err and f"must be 4 or 8, not '{bits}'" in err


@pytest.mark.parametrize("group", ["0", "-8", "abc", "1.5"])
def test_group_size_not_a_positive_integer(checkpoint_factory, tmp_path, capsys, group):
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "-o", str(tmp_path / "q"), "--bits", "4",
                    f"--group-size={group}")
    assert "--group-size" in err and "positive integer" in err


def test_group_size_that_does_not_divide_the_experts(checkpoint_factory, tmp_path, capsys):
    """Expert intermediate 16, hidden 32: 32 does not divide the down projection's 16 inputs."""
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "-o", str(tmp_path / "q"), "--bits", "4",
                    "--group-size", "32")
    assert "group size 32 does not divide the in_features 16" in err and "is 16" in err


def test_dense_model(dense_model, tmp_path, capsys):
    err = _quantize(capsys, tmp_path, dense_model, "-o", str(tmp_path / "q"), "--bits", "4")
    assert "not a MoE checkpoint" in err


def test_already_quantized_input(quantized_model, tmp_path, capsys):
    err = _quantize(capsys, tmp_path, quantized_model, "-o", str(tmp_path / "q"), "--bits", "8", "--group-size", "8")
    assert "already quantized" in err and "compressed-tensors" in err


def test_output_folder_not_empty(checkpoint_factory, tmp_path, capsys):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "-o", str(tmp_path / "q"), "--bits", "4",
                    "--group-size", "8")
    assert "exists and is not empty" in err
    assert os.listdir(tmp_path / "q") == ["keep.txt"]


def test_output_is_a_file(checkpoint_factory, tmp_path, capsys):
    (tmp_path / "q").write_text("mine")
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "-o", str(tmp_path / "q"), "--bits", "4",
                    "--group-size", "8")
    assert "not a folder" in err


def test_missing_input(tmp_path, capsys):
    err = _quantize(capsys, tmp_path, str(tmp_path / "nowhere"), "-o", str(tmp_path / "q"), "--bits", "4")
    assert "model path not found" in err


def test_missing_output_flag(checkpoint_factory, tmp_path, capsys):
    err = _quantize(capsys, tmp_path, checkpoint_factory("qwen3_moe"), "--bits", "4")
    assert "--output" in err


def test_real_process_exit_status(tmp_path):
    """Through the interpreter, as a user runs it: status 2, one line on stderr."""
    result = subprocess.run([sys.executable, "-m", "moe_offload.cli", "quantize", str(tmp_path / "nowhere"), "-o",
                             str(tmp_path / "q"), "--bits", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith(PREFIX)
    assert os.listdir(tmp_path) == []


def test_gpt_oss_is_refused_not_split_as_if_it_were_qwen(tmp_path_factory, tmp_path, capsys):
    """GPT-OSS's fused experts are transposed, interleaved and biased: splitting them as [E, 2I, H] would write
    a wrong checkpoint, so quantize names the model instead."""
    from tiny_models import make_gpt_oss_checkpoint

    source = make_gpt_oss_checkpoint(str(tmp_path_factory.mktemp("gpt-oss")))
    err = _quantize(capsys, tmp_path, source, "-o", str(tmp_path / "q"), "--bits", "4", "--group-size", "8")
    assert "GPT-OSS experts" in err and "not quantized by `quantize`" in err and "MXFP4" in err
