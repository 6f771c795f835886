"""`moe-offload bench` (tools/benchmark.py, tools/report.py): flags, the warm-up rule, the report schema, the ratio sweep and
one-line errors. Real generations use a tiny checkpoint and a few tokens, so timings are not checked, only what
they must satisfy whatever the machine.
"""

import csv
import json
import sys

import pytest
import torch

from moe_offload import MoeOffloadError
from moe_offload import pipeline
from moe_offload.cli import _Parser, main
from moe_offload.tools.benchmark import DEFAULT_INFER_COUNT, DEFAULT_PROMPT, add_bench_command, check_args
from moe_offload.tools.report import AVERAGED_FIELDS, ITERATION_FIELDS, REPORT_SCHEMA, summarize, validate

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def parse(*argv):
    parser = _Parser(prog="moe-offload")
    add_bench_command(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    return parser.parse_args(["bench", *argv])


def row(iteration, **values):
    """A schema-valid iteration row; `values` override the defaults."""
    base = {name: None for name in ITERATION_FIELDS}
    base.update({name: 0 for name, types in ITERATION_FIELDS.items() if type(None) not in types})
    base.update(iteration=iteration, warm_up=iteration == 0, ratio=50, **values)
    return base


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory("qwen3_moe")


# ------------------------------------------------------------------------------------------- flags


def test_defaults():
    args = parse()
    assert (args.model, args.device, args.task, args.infer_count, args.num_iters) == (
        None, None, "text_gen", DEFAULT_INFER_COUNT, 1)
    assert args.prompt is args.prompt_file is args.load_config is args.sweep_ratio is None
    assert args.report_json is args.report is args.plot is None


def test_llm_bench_flags(tmp_path):
    args = parse("-m", "M", "-d", "GPU", "-t", "text_gen", "-ic", "128", "-lc", "config.json", "-n", "3",
                 "-pf", "p.jsonl", "-rj", "r.json", "-r", "r.csv", "--sweep-ratio", "100,0", "--plot", "p.png")
    assert (args.model, args.device, args.infer_count, args.load_config, args.num_iters) == (
        "M", "GPU", 128, "config.json", 3)
    assert (args.prompt_file, args.report_json, args.report, args.sweep_ratio, args.plot) == (
        "p.jsonl", "r.json", "r.csv", "100,0", "p.png")


def test_load_config_inline_or_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"MOE_OFFLOAD_RATIO": 37, "MOE_DTYPE": "fp32"}')
    from_file = check_args(parse("-m", str(tmp_path), "-d", "cpu", "-lc", str(config)))
    inline = check_args(parse("-m", str(tmp_path), "-d", "cpu", "-lc", config.read_text()))
    assert from_file.properties == inline.properties == {"MOE_OFFLOAD_RATIO": 37, "MOE_DTYPE": "fp32"}
    assert from_file.ratios == [None] and from_file.prompt == DEFAULT_PROMPT
    assert check_args(parse("-m", str(tmp_path), "-d", "cpu", "--sweep-ratio", " 100, 10,0")).ratios == [100, 10, 0]


def test_prompt_files(tmp_path):
    text = tmp_path / "prompt.txt"
    text.write_text("line one\nline two\n")
    jsonl = tmp_path / "prompt.jsonl"
    jsonl.write_text('\n{"prompt": "What is MoE?"}\n')
    assert check_args(parse("-m", str(tmp_path), "-d", "cpu", "-pf", str(text))).prompt == "line one\nline two"
    assert check_args(parse("-m", str(tmp_path), "-d", "cpu", "-pf", str(jsonl))).prompt == "What is MoE?"
    assert check_args(parse("-m", str(tmp_path), "-d", "cpu", "-p", "x")).prompt == "x"


# ------------------------------------------------------------------------------------------- warm-up rule


def test_summarize_excludes_warm_up():
    rows = [row(0, first_latency_ms=1000.0, throughput_tps=1.0, hit_rate=0.0),
            row(1, first_latency_ms=10.0, throughput_tps=100.0, hit_rate=0.5),
            row(2, first_latency_ms=30.0, throughput_tps=300.0, hit_rate=None)]
    average = summarize(rows)
    assert average["iterations"] == 2
    assert average["first_latency_ms"] == {"mean": 20.0, "std": 10.0}  # population std
    assert average["throughput_tps"]["mean"] == 200.0
    assert average["hit_rate"] == {"mean": 0.5, "std": 0.0}  # None values are left out
    assert average["second_avg_latency_ms"] == {"mean": None, "std": None}
    assert summarize([row(0, first_latency_ms=5.0)])["first_latency_ms"]["mean"] is None


def test_two_real_iterations(model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["-m", model, "-d", "cpu", "-ic", "3", "-n", "1", "-p", "def f(x):", "-lc", '{"MOE_OFFLOAD_RATIO": 25}',
            "-rj", str(out / "r.json"), "-r", str(out / "r.csv")]
    assert main(["bench", *argv]) == 0
    console = capsys.readouterr().out
    for line in ("[warm-up] Input token size:", "[1] First token latency:", "[1] First infer latency:",
                 "[1] Max rss memory cost:", "[1] MoE offload: ratio 25", "<<< Warm-up iteration is excluded. >>>",
                 "[Total] Iterations: 1", "[Average] Latency:"):
        assert line in console
    report = json.loads((out / "r.json").read_text())
    validate(report)
    (run,) = report["runs"]
    warm_up, measured = run["iterations"]
    assert warm_up["warm_up"] and not measured["warm_up"] and run["average"]["iterations"] == 1
    for name in AVERAGED_FIELDS:  # one measured iteration: its values are the averages, the warm-up's are not
        assert run["average"][name]["mean"] == measured[name]
    assert measured["output_size"] == measured["infer_count"] == measured["forwards"] == 3
    assert measured["first_latency_ms"] >= measured["first_infer_ms"] > 0
    assert measured["throughput_tps"] == pytest.approx(1000 / measured["second_avg_latency_ms"])
    assert measured["hits"] + measured["misses"] > 0 and measured["max_device_bytes"] is None
    assert run["ratio"] == 25 and report["metadata"]["device"] == "cpu"
    assert report["metadata"]["properties"] == {"MOE_OFFLOAD_RATIO": 25}
    with open(out / "r.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(ITERATION_FIELDS)
    assert [r[1] for r in rows[1:]] == ["0", "1", "average"]


# ------------------------------------------------------------------------------------------- schema


def test_schema_rejects_drift():
    runs = [{"ratio": 0, "properties": {}, "load_s": 1.0, "device_weight_bytes": 1, "offload": {},
             "iterations": [row(0), row(1)], "average": summarize([row(0), row(1)])}]
    metadata = {key: "x" for key in REPORT_SCHEMA["metadata"]}
    metadata.update(infer_count=1, num_iters=1, properties={},
                    versions={k: "1" for k in REPORT_SCHEMA["metadata"]["versions"]},
                    machine={"platform": "p", "cpu_count": 2, "gpu": None})
    report = {"schema": "moe-offload-bench/1", "metadata": metadata, "runs": runs}
    validate(report)
    runs[0]["iterations"][1]["hits"] = True  # a bool is not a count
    with pytest.raises(ValueError, match=r"runs\[0\]\.iterations\[1\]\.hits"):
        validate(report)
    runs[0]["iterations"][1]["hits"] = 0
    del runs[0]["average"]["hit_rate"]
    with pytest.raises(ValueError, match="missing.*hit_rate"):
        validate(report)


# ------------------------------------------------------------------------------------------- sweep


def test_sweep_writes_one_report(model, tmp_path, capsys):
    argv = ["-m", model, "-d", "cpu", "-ic", "2", "-n", "1", "-p", "import os", "--sweep-ratio", "100,0",
            "-lc", '{"MOE_OFFLOAD_RATIO": 37, "MOE_HOST_CACHE": 0}', "-rj", str(tmp_path / "s.json"),
            "-r", str(tmp_path / "s.csv")]
    if HAVE_MATPLOTLIB:
        argv += ["--plot", str(tmp_path / "s.png")]
    assert main(["bench", *argv]) == 0
    assert "Sweep over MOE_OFFLOAD_RATIO" in capsys.readouterr().out
    report = json.loads((tmp_path / "s.json").read_text())
    validate(report)
    full, none = report["runs"]
    assert (full["ratio"], none["ratio"]) == (100, 0)
    assert full["properties"] == {"MOE_OFFLOAD_RATIO": 100, "MOE_HOST_CACHE": 0}  # the sweep overrides -lc
    assert report["metadata"]["properties"]["MOE_OFFLOAD_RATIO"] == 37
    assert full["average"]["hit_rate"]["mean"] == 1.0 and none["average"]["hit_rate"]["mean"] == 0.0
    assert none["average"]["disk_bytes_per_token"]["mean"] > 0 == full["average"]["disk_bytes_per_token"]["mean"]
    assert full["device_weight_bytes"] > none["device_weight_bytes"]
    with open(tmp_path / "s.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + 2 * 3  # header + per ratio: warm-up, 1 iteration, average
    if HAVE_MATPLOTLIB:
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["-t", "image_gen"], "only text_gen"),
    (["-ic", "0"], "-ic must be at least 1"),
    (["-n", "0"], "-n must be at least 1"),
    (["-ic", "many"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["-d", "tpu"], "unknown device"),
    (["-lc", "MISSING/config.json"], "config file not found"),
    (["-lc", "{bad json"], "not valid JSON"),
    (["-lc", "LIST_FILE"], "must be a JSON object"),
    (["-lc", '{"MOE_RATIO": 5}'], "unknown property"),
    (["-lc", '{"MOE_OFFLOAD_RATIO": 101}'], "integer 0-100"),
    (["--sweep-ratio", "100,abc"], "'abc' is not an integer 0-100"),
    (["--sweep-ratio", "100,,0"], "'' is not an integer 0-100"),
    (["--sweep-ratio", "50,150"], "'150' is not an integer 0-100"),
    (["--sweep-ratio", "50,50"], "listed twice"),
    (["-pf", "MISSING/prompt.txt"], "prompt file not found"),
    (["-p", "x", "-pf", "y"], "not allowed with"),
    (["-p", "  "], "empty prompt"),
    (["-rj", "TMP"], "is a folder"),
])
def test_errors_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    names = {"TMP": str(tmp_path), "LIST_FILE": str(tmp_path / "list.json")}
    argv = [names.get(a, a.replace("MISSING", str(tmp_path / "missing"))) for a in argv]
    assert main(["bench", "-m", str(tmp_path), "-d", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-offload: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n', "holds 2 prompts"),
    ('{"text": "a"}\n', 'expected {"prompt": "..."}'),
    ("{oops\n", "not valid JSON"),
    ("\n", "holds 0 prompts"),
])
def test_bad_prompt_files(content, message, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(MoeOffloadError, match=message.replace("{", r"\{").replace(".", r"\.")):
        check_args(parse("-m", str(tmp_path), "-d", "cpu", "-pf", str(path)))


def test_missing_model_and_missing_matplotlib(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", str(tmp_path / "no-model"))
    with pytest.raises(MoeOffloadError, match="shipped small model is not installed"):
        check_args(parse("-d", "cpu"))
    assert main(["bench", "-m", str(tmp_path / "nothing"), "-d", "cpu", "-ic", "1"]) == 2
    assert "model path not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(MoeOffloadError, match="--plot needs matplotlib"):
        check_args(parse("-m", model, "-d", "cpu", "--plot", str(tmp_path / "p.png")))
    assert check_args(parse("-m", model, "-d", "cpu")).model == model  # no plot asked: not needed


def test_timer_times_a_replayed_prefill_from_prompt_to_first_token():
    """A prefill replayed from a CUDA graph runs no forward hook: the timer times it from the prompt to the first
    token, calls after_prefill once, and later eager forwards count as further forwards."""
    from moe_offload.tools.benchmark import GenerationTimer

    model, calls = torch.nn.Linear(2, 2), []
    timer = GenerationTimer(model, lambda: None, after_prefill=lambda: calls.append("prefill"))
    timer.put(torch.tensor([[5, 6, 7]]))  # the prompt
    timer.put(torch.tensor([8]))  # first token, no forward seen: the prefill was replayed
    model(torch.zeros(1, 2))  # an eager decode step
    timer.put(torch.tensor([9]))
    timer.detach()
    assert calls == ["prefill"] and len(timer.forward_ms) == 2 and len(timer.token_times) == 2

    eager = GenerationTimer(model, lambda: None, after_prefill=lambda: calls.append("eager"))
    eager.put(torch.tensor([[5]]))
    model(torch.zeros(1, 2))  # the prefill, eager
    eager.put(torch.tensor([8]))
    eager.detach()
    assert calls[1:] == ["eager"] and len(eager.forward_ms) == 1


def test_host_bytes_count_misses_read_in_place(model):
    """With zero-copy, misses cross PCIe without a copy: the report's host bytes still count them."""
    pytest.importorskip("triton")
    from moe_offload.tools.benchmark import run_iteration
    from moe_offload.kernels.triton_moe import fused_moe

    pipe = pipeline.LLMPipeline(model, "cpu", MOE_OFFLOAD_RATIO=25)
    for layer in pipe.layers:
        layer.fused_moe = fused_moe
        assert layer.enable_direct(pipe.device)
    row = run_iteration(pipe, "def f(x):", 2, 1)
    stats = pipe.get_offload_stats()
    assert stats["bytes_streamed"]["host"] == 0 and stats["bytes_read_in_place"] > 0
    assert row["host_bytes"] == stats["bytes_read_in_place"] and row["misses"] == stats["experts_read_in_place"]
