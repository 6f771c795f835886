"""What properties left at auto become (moe_offload/defaults.py), and the profile store they are kept in
(moe_offload/profile.py): each rule pinned on given machine facts, so a change of default is a change of test."""

import json
import os
import types

import pytest
import torch

from moe_offload import LLMPipeline, defaults
from moe_offload.errors import MoeOffloadError
from moe_offload.profile import Profile, code_version

GiB = 2**30
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_meminfo_is_read_as_memavailable_not_memfree(tmp_path):
    """Right after a download the page cache fills MemFree's share: MemAvailable counts it as RAM we can have."""
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   50000000 kB\n")
    assert defaults.memory_info(str(path)) == {"total": 65536000 * 1024, "available": 50000000 * 1024}


@pytest.mark.parametrize("user, needed, available, want_bytes, want_in_why", [
    (5 * GiB, 40 * GiB, 60 * GiB, 5 * GiB, "set by the user"),
    (None, 0, 60 * GiB, 0, "every routed expert is resident"),
    (None, 40 * GiB, 60 * GiB, 40 * GiB, "holds every expert"),  # 64 GiB machine: 6.4 GiB reserve, 53.6 spare
    (None, 40 * GiB, 45 * GiB, int(45 * GiB - 6.4 * GiB), "disk tier"),  # 38.6 GiB fit, the rest on disk
    (None, 40 * GiB, 3 * GiB, 0, "disk tier"),  # less than the reserve available: nothing pinned
])
def test_host_cache_holds_every_expert_where_memavailable_allows(user, needed, available, want_bytes, want_in_why):
    memory = {"total": 64 * GiB, "available": available}
    got, choice = defaults.host_cache(user, needed, memory)
    assert abs(got - want_bytes) <= 1 and choice.name == "MOE_HOST_CACHE" and want_in_why in choice.why


@pytest.mark.parametrize("mode, device, ratio, hostable, want, want_in_why", [
    ("auto", CUDA, 25, None, True, "device memory is saved"),
    ("auto", CUDA, 100, None, False, "every expert is resident"),
    ("auto", CUDA, 25, "the table is tied to the output layer", False, "tied"),
    ("auto", CPU, 25, None, False, "CUDA"),
    ("off", CUDA, 25, None, False, "set by the user"),
    ("on", CUDA, 100, None, True, "set by the user"),
])
def test_host_embeddings_go_to_host_ram_where_experts_are_offloaded(mode, device, ratio, hostable, want,
                                                                     want_in_why):
    on, choice = defaults.host_embeddings(mode, device, ratio, hostable)
    assert on is want and choice.value == ("on" if want else "off") and want_in_why in choice.why


@pytest.mark.parametrize("device, hostable", [(CPU, None), (CUDA, "the table is tied to the output layer")])
def test_host_embeddings_on_where_impossible_is_an_error_not_a_no_op(device, hostable):
    with pytest.raises(MoeOffloadError, match="MOE_HOST_EMBEDDINGS=on is not possible here"):
        defaults.host_embeddings("on", device, 25, hostable)


def _tuned(table, from_profile=False, path="/cache/p.json", kernel="numba", copy_bytes=0):
    profile = types.SimpleNamespace(path=path, stored={"result": {}})
    return types.SimpleNamespace(kernel=kernel, table=table, from_profile=from_profile, profile=profile,
                                 copy_bytes=copy_bytes)


@pytest.mark.parametrize("mode, device, tuned, check, want_value, want_in_why", [
    ("off", CUDA, None, None, "off", "set by the user"),
    ("auto", CPU, None, None, "off", "CPU device"),
    ("auto", CUDA, None, None, "off", "no layer reads misses in place"),
    ("auto", CUDA, _tuned([0, 1, 1]), {"decode_tok_s": {"on": 80.0, "off": 60.0}, "kept": True},
     "on (numba kernel, split [0, 1, 1])", "decode 80.0 tok/s with the CPU share, 60.0 without"),
    ("auto", CUDA, _tuned([0, 1, 1]), {"decode_tok_s": {"on": 50.0, "off": 60.0}, "kept": False},
     "off", "measured at this load, kept in /cache/p.json"),
    ("auto", CUDA, _tuned([0, 0, 0]), None, "off", "no faster"),
    ("auto", CUDA, _tuned([0, 1, 2], from_profile=True), {"decode_tok_s": None, "kept": True},
     "on (numba kernel, split [0, 1, 2])", "from this machine's profile /cache/p.json"),
    ("auto", CUDA, _tuned([0, 1, 2], kernel="int4pack", copy_bytes=3 << 29), {"decode_tok_s": None, "kept": True},
     "on (int4pack kernel, split [0, 1, 2])", "repacked copy of the host tier's experts takes 1.5GiB of RAM"),
])
def test_cpu_experts_choice_says_what_was_measured(mode, device, tuned, check, want_value, want_in_why):
    choice = defaults.cpu_experts(mode, device, tuned, check, enabled_layers=6)
    assert choice.value == want_value and want_in_why in choice.why


def test_profile_round_trip_and_what_it_refuses(tmp_path, caplog):
    key = {"machine": {"gpu": "H200"}, "model": "abc", "placement": [[16, 4, 16]], "code": code_version()}
    profile = Profile(key, str(tmp_path))
    assert profile.stored is None
    assert profile.save({"kernel": "numba", "table": [0, 1, 1], "kept": True}) == profile.path
    assert Profile(key, str(tmp_path)).stored["result"]["table"] == [0, 1, 1]
    assert os.listdir(tmp_path) == [os.path.basename(profile.path)]  # no partial file left behind
    assert Profile({**key, "model": "another"}, str(tmp_path)).path != profile.path
    with open(profile.path, "w") as handle:  # a file another key wrote under this name (or a hand edit)
        json.dump({"key": {"other": 1}, "result": {}}, handle)
    assert Profile(key, str(tmp_path)).stored is None
    with open(profile.path, "w") as handle:
        handle.write("{ half-written")
    assert Profile(key, str(tmp_path)).stored is None and "unreadable tuning profile" in caplog.text
    fresh = Profile(key, str(tmp_path))
    fresh.forget()
    assert fresh.stored is None


def test_profile_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert Profile({"k": 1}, str(blocker / "profiles")).save({"kept": False}) is None
    assert "could not save the tuning profile" in caplog.text


def test_code_version_is_a_digest_of_the_sources():
    assert len(code_version()) == 16 and int(code_version(), 16) >= 0


def test_a_default_load_says_what_it_chose_and_why(caplog):
    """Nothing set but the ratio: every auto property is resolved, logged, and in the stats."""
    import logging

    with caplog.at_level(logging.INFO, logger="moe_offload"):
        pipe = LLMPipeline(None, "cpu", MOE_OFFLOAD_RATIO=25)
    names = [choice.name for choice in pipe.choices]
    assert names == ["MOE_HOST_CACHE", "MOE_HOST_EMBEDDINGS", "MOE_CPU_EXPERTS"]
    assert pipe.get_offload_stats()["choices"]["MOE_HOST_EMBEDDINGS"] == {"value": "off",
                                                                          "why": "it needs a CUDA device"}
    assert all(choice.line() in caplog.text for choice in pipe.choices)
    host = pipe.get_offload_stats()
    assert host["host_tier_experts"] == host["total_experts"]  # the tiny model's experts all fit in RAM
