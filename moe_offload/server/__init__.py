"""`moe-offload serve`: an OpenAI-compatible HTTP server in front of one LLMPipeline.

The engine decodes one sequence at a time (batch 1), so the server is a queue in front of one generation
thread, not a batcher: requests wait in a bounded queue (a full one answers 429) and run one after another.
Modules, one job each:
  errors.py      OpenAI's error JSON shape; every failure a request can cause maps to a 4xx in it
  schemas.py     the request bodies (pydantic, strict: wrong types are a 400, not a silent coercion)
  prepare.py     a validated body + the model -> a Job: prompt ids, token budget, sampling, stop strings
  textstream.py  token ids -> text deltas, holding back split characters and possible stop strings
  worker.py      the bounded queue and the one thread that runs pipe.generate_tokens
  metrics.py     counters and their Prometheus text
  app.py         the FastAPI routes, API-key check and SSE streaming
  command.py     the `serve` subcommand: load the model, bind the socket, run uvicorn
  static/chat.html  the chat page served at /
FastAPI and uvicorn are the optional extra `[serve]`; nothing outside this package imports it but cli.py.
"""
