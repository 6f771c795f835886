"""What the server costs over calling the pipeline: time to first token and decode tokens/s of the same greedy
generation, direct (pipe.generate_tokens with a streamer) and through `moe-offload serve` (a real uvicorn server in
this process, the official openai client streaming over localhost HTTP). The server adds HTTP, JSON per chunk, a
thread hop per token and incremental detokenization; on a GPU, where a decode step is a few milliseconds, that
share is what this measures.

    python -m bench.server_overhead [-m MODEL] [-d cuda] [-n 128] [-r 5] [--ratio 37] [--out FILE.json]

Medians (min, max) of `-r` repeats after one warm-up of each; the prompt is fixed text, tokens/s counts the
tokens after the first over the time from the first to the last.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

PROMPT = "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n"


class _Clock:
    """A streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def direct(pipe, new_tokens: int) -> tuple[float, float]:
    ids = pipe.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(pipe.device)
    clock = _Clock()
    start = time.perf_counter()
    pipe.generate_tokens(ids, streamer=clock, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False)
    return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def served(client, model: str, new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    times, tokens = [], 0
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=new_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return times[0] - start, (tokens - 1) / (times[-1] - times[0])


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    import openai

    from moe_offload import LLMPipeline
    from moe_offload.server.command import make_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-d", "--device", default=None)
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("-r", "--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    pipe = LLMPipeline(args.model, args.device, MOE_OFFLOAD_RATIO=args.ratio)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server, service = make_server(pipe, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0)
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "server": []}
    try:
        for repeat in range(args.repeats + 1):  # repeat 0 warms both up and is left out
            for name, run in (("direct", lambda: direct(pipe, args.new_tokens)),
                              ("server", lambda: served(client, service.served.name, args.new_tokens))):
                measured = run()
                if repeat:
                    results[name].append(measured)
    finally:
        server.should_exit = True
        thread.join(10)
        service.worker.close()
    report = {"device": str(pipe.device), "model": service.served.name, "ratio": args.ratio,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              **{name: {"ttft_s": summary([r[0] for r in runs]), "decode_tok_s": summary([r[1] for r in runs])}
                 for name, runs in results.items()}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
