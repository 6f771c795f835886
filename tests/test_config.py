"""Property parsing (config.py) and where properties come from: -lc file, inline JSON, keywords, CLI flags."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_offload import LLMPipeline, MoeOffloadError, OffloadConfig
from moe_offload.cli import main
from moe_offload.config import DIAGNOSTICS, PROPERTIES, load_properties_file, make_config, parse_ratio, parse_size

ARCH = "qwen3_moe"  # 2 MoE layers x 8 experts, 6144 bytes per expert (float32)
EXPERT_BYTES = 3 * 16 * 32 * 4


# -- MOE_OFFLOAD_RATIO -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, ratio, resident", [
    (60, 37, 22),  # 22.2 -> 22
    (8, 37, 3),  # 2.96 -> 3
    (128, 25, 32),
    (8, 25, 2),
    (6, 25, 2),  # 1.5: half rounds up
    (2, 25, 1),  # 0.5: half rounds up
    (4, 10, 0),  # 0.4 -> 0
    (60, 0, 0), (8, 0, 0), (1, 0, 0),
    (60, 100, 60), (8, 100, 8), (128, 100, 128), (1, 100, 1),
    (1, 50, 1), (3, 50, 2), (64, 99, 63), (256, 1, 3),
])
def test_resident_count_rounds_half_up(experts, ratio, resident):
    assert OffloadConfig(moe_offload_ratio=ratio).resident_count(experts) == resident
    assert make_config({"MOE_OFFLOAD_RATIO": ratio}).resident_count(experts) == resident


def test_resident_count_never_exceeds_experts_and_is_monotonic():
    for experts in (1, 2, 3, 7, 8, 60, 64, 128, 160, 256):
        counts = [OffloadConfig(moe_offload_ratio=r).resident_count(experts) for r in range(101)]
        assert counts[0] == 0 and counts[100] == experts
        assert all(a <= b for a, b in zip(counts, counts[1:]))


@pytest.mark.parametrize("value, expected", [
    (0, 0), (100, 100), (37, 37), ("37", 37), (" 25 ", 25), (37.0, 37), ("50.0", 50), ("0", 0),
])
def test_parse_ratio_accepts(value, expected):
    assert parse_ratio(value) == expected
    assert isinstance(parse_ratio(value), int)


@pytest.mark.parametrize("value", [101, -1, "abc", 37.5, "37.5", True, False, None, "", float("nan"),
                                   float("inf"), [50], "1e2x"])
def test_parse_ratio_rejects(value):
    with pytest.raises(MoeOffloadError, match="MOE_OFFLOAD_RATIO must be an integer 0-100"):
        parse_ratio(value)


# -- MOE_HOST_CACHE ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("64GiB", 64 * 2**30),
    ("512MB", 512 * 10**6),
    (0, 0),
    ("0", 0),
    ("auto", None),
    ("AUTO", None),
    (" auto ", None),
    (12345, 12345),
    ("12345", 12345),
    ("12345B", 12345),
    ("8gib", 8 * 2**30),
    ("2 KiB", 2048),
    ("1.5GiB", 3 * 2**29),
    ("3kb", 3000),
    ("1TiB", 2**40),
    ("2TB", 2 * 10**12),
    ("7MiB", 7 * 2**20),
    ("4GB", 4 * 10**9),
])
def test_parse_size(value, expected):
    assert parse_size(value, "MOE_HOST_CACHE") == expected
    assert make_config({"MOE_HOST_CACHE": value}).moe_host_cache_bytes == expected


@pytest.mark.parametrize("value", [-1, "-1", "lots", "64 GiBs", "64XB", "GiB", "", True, None, "1,5GB", [1]])
def test_parse_size_rejects(value):
    with pytest.raises(MoeOffloadError, match="MOE_HOST_CACHE must be a byte count"):
        parse_size(value, "MOE_HOST_CACHE")


# -- names, choices and defaults ---------------------------------------------------------------------------------

def test_defaults(monkeypatch):
    for name in DIAGNOSTICS:
        monkeypatch.delenv(name, raising=False)
    config = make_config({})
    assert config == OffloadConfig()
    assert (config.moe_offload_ratio, config.moe_host_cache_bytes, config.moe_dtype) == (100, None, "auto")
    # auto: decided at load for the machine (moe_offload/defaults.py, tests/test_defaults.py)
    assert (config.moe_host_embeddings, config.moe_cpu_experts, config.moe_cpu_threads) == ("auto", "auto", None)
    assert (config.moe_kernel, config.moe_zero_copy, config.moe_cuda_graph, config.moe_fuse_dense, config.moe_io) == \
        ("auto", "auto", "auto", "auto", "odirect")


def test_at_most_ten_properties_and_no_field_set_twice():
    """The issue's cap counts the memory budget's two properties to come (MOE_DEVICE_MEMORY, MOE_CONTEXT)."""
    assert len(PROPERTIES) + 2 <= 10
    fields = [field for field, _, _ in PROPERTIES.values()] + [field for field, _, _ in DIAGNOSTICS.values()]
    assert len(fields) == len(set(fields)) == len(dataclasses.fields(OffloadConfig))


@pytest.mark.parametrize("name", ["MOE_OFFLOAD_RATIO", "moe_offload_ratio", "Moe_Offload_Ratio", "mOe_oFfLoAd_RaTiO"])
def test_property_names_are_case_insensitive(name):
    assert make_config({name: 37}).moe_offload_ratio == 37


def test_all_properties_case_insensitive_and_values_normalised():
    config = make_config({"moe_offload_ratio": "25", "Moe_Host_Cache": "1KiB", "MOE_dtype": "BF16",
                          "MOE_HOST_EMBEDDINGS": "ON", "MOE_CPU_EXPERTS": "ALL", "moe_cpu_threads": " 6 "}, {})
    assert config == OffloadConfig(moe_offload_ratio=25, moe_host_cache_bytes=1024, moe_dtype="bfloat16",
                                   moe_host_embeddings="on", moe_cpu_experts="all", moe_cpu_threads=6)


def test_diagnostics_come_from_the_environment():
    environ = {"MOE_KERNEL": " Torch ", "MOE_ZERO_COPY": "STATIC", "MOE_CUDA_GRAPH": "off", "MOE_FUSE_DENSE": "Off",
               "MOE_IO": "pread", "MOE_UNRELATED": "x"}
    config = make_config({"MOE_OFFLOAD_RATIO": 50}, environ)
    assert config == OffloadConfig(moe_offload_ratio=50, moe_kernel="torch", moe_zero_copy="static",
                                   moe_cuda_graph="off", moe_fuse_dense="off", moe_io="pread")
    assert make_config({}, {"MOE_KERNEL": ""}).moe_kernel == "auto"  # set but empty: the default


def test_diagnostics_read_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MOE_ZERO_COPY", "off")
    assert make_config({}).moe_zero_copy == "off"


@pytest.mark.parametrize("name", list(DIAGNOSTICS))
def test_a_diagnostic_passed_as_a_property_is_sent_to_the_environment(name):
    with pytest.raises(MoeOffloadError, match=f"{name} is a diagnostic switch, not a property: set it in the "
                                              "environment"):
        make_config({name.lower(): "auto"})


@pytest.mark.parametrize("value, expected", [("fp32", "float32"), ("f16", "float16"), ("fp16", "float16"),
                                             ("bfloat16", "bfloat16"), ("Auto", "auto")])
def test_dtype_aliases(value, expected):
    assert make_config({"MOE_DTYPE": value}).moe_dtype == expected


@pytest.mark.parametrize("name, value, words", [
    ("MOE_DTYPE", "int8", "MOE_DTYPE must be one of"),
    ("MOE_HOST_EMBEDDINGS", "yes", "MOE_HOST_EMBEDDINGS must be one of auto, on, off"),
    ("MOE_CPU_EXPERTS", "some", "MOE_CPU_EXPERTS must be one of auto, off, all"),
    ("MOE_CPU_THREADS", 0, "MOE_CPU_THREADS must be a positive integer or auto, got 0"),
    ("MOE_CPU_THREADS", "many", "MOE_CPU_THREADS must be a positive integer or auto, got 'many'"),
    ("MOE_CPU_THREADS", True, "MOE_CPU_THREADS must be a positive integer or auto, got True"),
    ("MOE_OFFLOAD", 5, "unknown property 'MOE_OFFLOAD'"),
    ("moe_host_cache_bytes", 5, "unknown property 'moe_host_cache_bytes'"),
    ("MOE_CPU_HANDOFF", "stream_wait", "unknown property 'MOE_CPU_HANDOFF'"),  # removed: one handoff
    ("MOE_HOST_HUGE_PAGES", "off", "unknown property 'MOE_HOST_HUGE_PAGES'"),  # removed: huge pages where given
])
def test_bad_names_and_choices(name, value, words):
    with pytest.raises(MoeOffloadError) as caught:
        make_config({name: value})
    assert words in str(caught.value)


@pytest.mark.parametrize("name, value, words", [
    ("MOE_IO", "mmap", "environment variable MOE_IO must be one of odirect, pread, got 'mmap'"),  # removed
    ("MOE_ZERO_COPY", "on", "environment variable MOE_ZERO_COPY must be one of auto, lru, static, off"),
    ("MOE_CUDA_GRAPH", "whole", "environment variable MOE_CUDA_GRAPH must be one of auto, off"),  # removed
    ("MOE_KERNEL", "cuda", "environment variable MOE_KERNEL must be one of auto, triton, torch"),
])
def test_bad_diagnostics(name, value, words):
    with pytest.raises(MoeOffloadError) as caught:
        make_config({}, {name: value})
    assert words in str(caught.value)


def test_unknown_property_lists_the_known_ones():
    with pytest.raises(MoeOffloadError) as caught:
        make_config({"MOE_OFFLOAD_RATIO": 50, "MOE_PREFETCH": "on"})
    message = str(caught.value)
    assert "MOE_PREFETCH" in message
    for known in PROPERTIES:
        assert known in message


# -- -lc: file or inline JSON ------------------------------------------------------------------------------------

def test_load_properties_file_and_inline(tmp_path):
    path = tmp_path / "props.json"
    path.write_text('{"MOE_OFFLOAD_RATIO": 37, "MOE_HOST_CACHE": "1GiB"}', encoding="utf-8")
    assert load_properties_file(str(path)) == {"MOE_OFFLOAD_RATIO": 37, "MOE_HOST_CACHE": "1GiB"}
    assert load_properties_file('{"MOE_OFFLOAD_RATIO": 37}') == {"MOE_OFFLOAD_RATIO": 37}
    assert load_properties_file('  {"moe_dtype": "bf16"}') == {"moe_dtype": "bf16"}
    with pytest.raises(MoeOffloadError, match="config file not found"):
        load_properties_file(str(tmp_path / "absent.json"))
    with pytest.raises(MoeOffloadError, match="not valid JSON"):
        load_properties_file('{"MOE_OFFLOAD_RATIO": 37')
    (tmp_path / "list.json").write_text("[37]", encoding="utf-8")
    with pytest.raises(MoeOffloadError, match="JSON object"):
        load_properties_file(str(tmp_path / "list.json"))


# -- precedence in LLMPipeline: keyword > config (file, inline JSON or dict) ------------------------------------

@pytest.fixture(scope="module")
def checkpoint_path(checkpoint_factory):
    return checkpoint_factory(ARCH)


@pytest.fixture(scope="module")
def props_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("props") / "props.json"
    path.write_text(json.dumps({"MOE_OFFLOAD_RATIO": 50, "MOE_HOST_CACHE": "12KiB", "MOE_DTYPE": "fp32"}))
    return str(path)


def _loaded(checkpoint_path, config=None, **properties):
    pipe = LLMPipeline(checkpoint_path, "cpu", config=config, **properties)
    stats = pipe.get_offload_stats()
    pipe.close()
    return pipe.config, stats


def test_pipeline_takes_config_file(checkpoint_path, props_file):
    config, stats = _loaded(checkpoint_path, props_file)
    assert config == OffloadConfig(moe_offload_ratio=50, moe_host_cache_bytes=12 * 1024, moe_dtype="float32")
    assert stats["resident_experts"] == 8  # 4 of 8 in each of 2 layers
    assert 12 * 1024 // 2 == EXPERT_BYTES  # 12 KiB over 2 layers: room for one expert per layer
    assert stats["host_tier_experts"] == 2 and stats["host_tier_bytes"] == 2 * EXPERT_BYTES


def test_pipeline_takes_inline_json_and_dict(checkpoint_path):
    config, stats = _loaded(checkpoint_path, '{"moe_offload_ratio": 25, "MOE_HOST_CACHE": 0}')
    assert (config.moe_offload_ratio, config.moe_host_cache_bytes) == (25, 0)
    assert stats["resident_experts"] == 4 and stats["host_tier_experts"] == 0
    config, stats = _loaded(checkpoint_path, {"MOE_OFFLOAD_RATIO": 37})
    assert config.moe_offload_ratio == 37 and stats["resident_experts"] == 6  # 8 * 0.37 = 2.96 -> 3 per layer


@pytest.mark.parametrize("keyword", ["MOE_OFFLOAD_RATIO", "moe_offload_ratio"])
def test_keyword_wins_over_config_file(checkpoint_path, props_file, keyword):
    config, stats = _loaded(checkpoint_path, props_file, **{keyword: 25})
    assert config.moe_offload_ratio == 25 and stats["resident_experts"] == 4
    assert config.moe_dtype == "float32" and config.moe_host_cache_bytes == 12 * 1024  # the rest of the file stays


@pytest.mark.parametrize("config", ['{"moe_offload_ratio": 100}', {"Moe_Offload_Ratio": 100},
                                    {"MOE_OFFLOAD_RATIO": 100}])
def test_keyword_wins_over_inline_json_and_dict_in_any_case(checkpoint_path, config):
    loaded, stats = _loaded(checkpoint_path, config, MOE_OFFLOAD_RATIO=0)
    assert loaded.moe_offload_ratio == 0 and stats["resident_experts"] == 0


def test_keyword_is_validated_even_when_config_is_fine(checkpoint_path, props_file):
    with pytest.raises(MoeOffloadError, match="MOE_OFFLOAD_RATIO"):
        LLMPipeline(checkpoint_path, "cpu", config=props_file, MOE_OFFLOAD_RATIO=101)


def test_cli_flag_wins_over_load_config(checkpoint_path, props_file, capsys):
    """`--ratio 25 -lc file(50)`: the explicit flag wins, as keywords do in the API."""
    rc = main(["generate", "hi", "--device", "cpu", "--model", checkpoint_path, "-n", "1", "--stats",
               "--ratio", "25", "-lc", props_file])
    out, err = capsys.readouterr()
    assert rc == 0, err
    stats = json.loads(err[err.index("{\n"):])  # after the progress bars
    assert stats["ratio"] == 25 and stats["resident_experts"] == 4 and stats["host_tier_experts"] == 2
