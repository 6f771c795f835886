"""The command line's hygiene (issue 19, part 6): --version, -m as the model in every command that takes one, and
a prompt from a file or from stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from moe_offload import __version__
from moe_offload.cli import main

PREFIX = "moe-offload: error:"


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-offload {__version__}"


def test_info_takes_the_model_as_m_or_argument(checkpoint_factory, capsys):
    path = checkpoint_factory("qwen3_moe")
    assert main(["info", "-m", path, "--json"]) == 0
    by_flag = json.loads(capsys.readouterr().out)
    assert main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_flag
    assert main(["info", path, "-m", path]) == 2
    assert "not both" in capsys.readouterr().err


def test_quantize_takes_the_model_as_m(tmp_path, capsys):
    assert main(["quantize", "-o", str(tmp_path / "out"), "--bits", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and "-m PATH" in err
    assert main(["quantize", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--bits", "4"]) == 2
    assert "missing" in capsys.readouterr().err  # got as far as the checkpoint: -m was taken as the model


@pytest.mark.parametrize("source", ["file", "stdin_flag", "stdin_argument"])
def test_prompt_from_a_file_or_stdin(checkpoint_factory, tmp_path, monkeypatch, capsys, source):
    path = checkpoint_factory("qwen3_moe")
    common = ["generate", "-m", path, "-d", "cpu", "-n", "3"]
    prompt = "def f(x):\n    return"
    assert main(common + [prompt]) == 0
    expected = capsys.readouterr().out
    if source == "file":
        prompt_file = tmp_path / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        argv = common + ["-f", str(prompt_file)]
    else:
        monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
        argv = common + (["-f", "-"] if source == "stdin_flag" else ["-"])
    assert main(argv) == 0
    assert capsys.readouterr().out == expected and expected.startswith(prompt)


def test_a_missing_prompt_file_is_one_line(tmp_path, capsys):
    assert main(["generate", "-d", "cpu", "-f", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prompt file not found" in err and "nope.txt" in err


def test_commands_run_without_the_serve_extra(tmp_path):
    """Only `serve` needs pydantic, fastapi and uvicorn (the [serve] extra): with them unimportable, the parser is
    built, `info --help` runs and `serve` says what to install, in one line."""
    script = ("import sys\n"
              "for name in ('pydantic', 'fastapi', 'uvicorn', 'starlette'):\n"
              "    sys.modules[name] = None  # import raises ImportError\n"
              "from moe_offload.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    run = lambda *argv: subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                                       cwd=tmp_path, timeout=120)
    assert run("--version").returncode == 0
    helped = run("info", "--help")
    assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr
    served = run("serve", "-m", str(tmp_path))
    assert served.returncode == 2 and served.stderr.count("\n") == 1, served.stderr
    assert "pip install 'moe-offload[serve]'" in served.stderr
