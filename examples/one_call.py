"""Three parties' notes answered in one multi-party call, with the standard `openai` client.

    python examples/one_call.py --base-url http://127.0.0.1:8000/v1

A trusted host (or a simulation) sends every party's part in `participants`; the server
runs them as one FedAttn session in which each part is its own vLLM request, coupled only
at the sync layers (the chat template's head is public: every party computes it). The
response is an ordinary chat completion plus a `fedattn` block. The server's default
setting is shown beside the paper's, every layer synced, and none.
"""

from __future__ import annotations

import argparse
import os

import openai

PARTIES = [
    "Alice's note: the meeting with the supplier is in Lisbon. ",
    "Bob's note: the meeting is on Thursday at 3 pm. ",
    "Question: in which city is the meeting with the supplier, and on which day? Answer briefly.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("FEDATTN_SERVER_API_KEY", "none"))
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"server model: {model}")
    # the paper's semantics: the question holder reads only at sync layers, exact K/V on the wire
    paper = {"generator_sync_interval": None, "kv_wire": "native"}
    for label, fedattn in [("the server's default: every layer synced, 4-bit keys and 2-bit values on the wire", None),
                           ("the paper's FedAttn, sync every 4th layer", {"sync_interval": 4, **paper}),
                           ("every layer synced, exact K/V (= centralised)", {"sync_interval": 1, **paper}),
                           ("no sync layers (each party alone)", {"placement": "explicit", "sync_layers": [], **paper})]:
        extra = {"participants": PARTIES, **({"fedattn": fedattn} if fedattn is not None else {})}
        reply = client.chat.completions.create(model=model, messages=[], max_tokens=32, temperature=0, extra_body=extra)
        usage = reply.model_extra["fedattn"]
        print(f"\n{label}: {len(usage['sync_layers'])} sync layers")
        print(f"  answer: {reply.choices[0].message.content.strip()!r}")
        for n, (tokens, up, down) in enumerate(zip(usage["tokens"], usage["published_bytes"], usage["received_bytes"])):
            print(f"  party {n + 1}: {tokens} private tokens, published {up / 1024:.1f} KiB, received {down / 1024:.1f} KiB")
        timings = usage["timings"]
        ttft = timings["time_to_first_token_s"]  # None only if no token was generated
        print(f"  time to first token {ttft:.2f} s" if ttft is not None else f"  answered in {timings['total_s']:.2f} s")
    single = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                            messages=[{"role": "user", "content": "Say hello in one short sentence."}])
    print(f"\nan ordinary single-party chat request: {single.choices[0].message.content.strip()!r}")


if __name__ == "__main__":
    main()
