"""Drives the relay with the official `openai` Python SDK: a non-streaming and a streaming
`responses.create` over HTTP, then `responses.connect()` over WebSocket. Prints one JSON line
per step; exits non-zero on the first failure.

    python scripts/sdk_check.py BASE_URL API_KEY
"""

import json
import sys

from openai import OpenAI


def step(name, **facts):
    print(json.dumps({"step": name, **facts}), flush=True)


def main(base_url: str, key: str) -> None:
    client = OpenAI(api_key=key, base_url=base_url, max_retries=0)

    session = {"session-id": "sdk-check"}
    r = client.responses.create(
        model="gpt-test", input="plain [[mock:text 5]]", extra_headers=session
    )
    assert r.status == "completed", r
    assert r.output_text, r
    step("create", id=r.id, text=r.output_text)

    events = list(
        client.responses.create(model="gpt-test", input="streamed [[mock:text 5]]", stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    step("create_stream", events=len(events), last=kinds[-1])

    chained = client.responses.create(
        model="gpt-test",
        input="chained [[mock:text 3]]",
        previous_response_id=r.id,
        extra_headers=session,
    )
    assert chained.status == "completed", chained
    step("chained", id=chained.id, previous=r.id)

    with client.responses.connect() as conn:
        conn.response.create(model="gpt-test", input="socket [[mock:text 5]]")
        kinds = []
        for event in conn:
            kinds.append(event.type)
            if event.type in ("response.completed", "response.failed", "error"):
                break
    assert kinds[-1] == "response.completed", kinds
    step("connect", events=len(kinds), last=kinds[-1])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
