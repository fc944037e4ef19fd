"""`predict.py --serve`: one process answering over HTTP, as the OpenAI chat completions API does, with a chat page.

    options.py   the --serve flags, their checks, the frozen `ServingConfig`
    requests.py  a request's JSON -> a checked `ChatRequest` and the `Sample` it asks about (images decoded);
                 `ApiError`, the OpenAI-shaped 4xx error
    engine.py    the models served: prompts built by the evaluation's collator, answers generated one request at
                 a time (queued) with the evaluation's options, streamed text, stop strings
    app.py       the FastAPI app (routes, API key, body limit, errors, server-sent events) and `serve`
    chat.html    the chat page served at /

Only options.py is imported by predict.py at start-up; FastAPI and uvicorn load when --serve is given.
"""
