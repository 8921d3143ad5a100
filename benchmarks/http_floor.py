"""The plain-HTTP floor of a one-token completion on this machine: the `openai` client against
a FastAPI + uvicorn route (in its own process) that answers at once, no model, no Ray.

    python benchmarks/http_floor.py

What a one-token completion's time outside llmray's replica (serve_load.py) is compared with:
that time minus this floor is what Ray Serve's proxy and router add.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time

SERVER = """
import sys
import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.post("/v1/chat/completions")
async def chat(body: dict) -> dict:
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": "a"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def main() -> int:
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        latencies = []
        for _ in range(101):
            start = time.perf_counter()
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1
            )
            latencies.append(time.perf_counter() - start)
        print(
            f"plain HTTP one-token round trip, p50: {statistics.median(latencies[1:]) * 1e3:.1f} ms"
        )
    finally:
        server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
