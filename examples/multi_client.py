"""Private multi-client session: N separate client processes, each holding only its own text.

    python examples/multi_client.py --base-url http://127.0.0.1:8000

The host creates a session and hands each participant its join token (here: to a child
process). Every participant process sends only its own part; the last one (the generator)
streams the joint answer, the others get a usage record of what they shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os

import httpx

PRIVATE_TEXTS = [
    "Alice (clinic): patient 17 is allergic to penicillin. ",
    "Bob (pharmacy): patient 17 was prescribed amoxicillin yesterday. ",
    "Carol (doctor): is there a problem with patient 17's prescription? Answer in one sentence.",
]


def participant(base_url: str, headers: dict, session_id: str, index: int, token: str, stream: bool) -> None:
    """One party's own process: it knows its text and its token, nothing else."""
    body = {"token": token, "content": PRIVATE_TEXTS[index], "stream": stream}
    url = f"{base_url}/v1/fedattn/sessions/{session_id}/participants/{index}"
    if stream:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as response:
            pieces = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(p["choices"][0].get("delta", {}).get("content", "") for p in pieces if "choices" in p)
        print(f"party {index + 1} (generator) got the answer: {text.strip()!r}", flush=True)
    else:
        usage = httpx.post(url, json=body, headers=headers, timeout=600).json()["fedattn"]
        print(f"party {index + 1} shared {usage['published_bytes'] / 1024:.0f} KiB of K/V "  # its own numbers only
              f"(its {usage['tokens']} tokens stayed private)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("FEDATTN_SERVER_API_KEY"))
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(f"{args.base_url}/v1/models", headers=headers).json()["data"][0]["id"]
    session = httpx.post(f"{args.base_url}/v1/fedattn/sessions", headers=headers, json={
        "model": model, "participants": len(PRIVATE_TEXTS), "fedattn": {"sync_interval": 1},
        "max_tokens": 40, "temperature": 0, "join_timeout_s": 120}).json()
    print(f"session {session['id']}: generators {session['generators']}")
    last = len(PRIVATE_TEXTS) - 1
    processes = [multiprocessing.Process(target=participant, args=(args.base_url, headers, session["id"], p["index"],
                                                                    p["token"], p["index"] == last))
                 for p in session["participants"]]
    for process in processes:
        process.start()
    for process in processes:
        process.join()


if __name__ == "__main__":
    main()
