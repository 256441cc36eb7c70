"""Compare a served run's /metrics histograms (scraped before and after) with the load
generator's own per-request numbers, and check the phase identities:
queue + inference = e2e (less the front end's share), prefill + decode = inference."""
import argparse
import json

from braid.bench.soak import parse_metrics

PHASES = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
          "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds",
          "request_time_per_output_token_seconds")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("client_json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    before, after = (parse_metrics(open(p).read()) for p in (args.before, args.after))
    server = {}
    for name in PHASES:
        n = after[f"braid:{name}_count"] - before.get(f"braid:{name}_count", 0)
        total = after[f"braid:{name}_sum"] - before.get(f"braid:{name}_sum", 0)
        server[name] = {"count": n, "mean_s": total / n if n else None}
    client = json.load(open(args.client_json))["runs"][0]["summary"]  # its warm-up requests are not in it
    mean = lambda k: server[k]["mean_s"]  # noqa: E731
    result = {
        "server": server,
        "client": {k: client.get(k) for k in ("completed", "mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms")},
        # What the server never sees: HTTP, the wait for the event loop, admission, delivery.
        "client_minus_server_ms": {
            "ttft": client["mean_ttft_ms"] - 1e3 * mean("time_to_first_token_seconds"),
            "e2e": client["mean_e2el_ms"] - 1e3 * mean("e2e_request_latency_seconds"),
        },
        "identities_ms": {
            "e2e - (queue + inference)": 1e3 * (mean("e2e_request_latency_seconds") - mean("request_queue_time_seconds")
                                                - mean("request_inference_time_seconds")),
            "inference - (prefill + decode)": 1e3 * (mean("request_inference_time_seconds")
                                                     - mean("request_prefill_time_seconds")
                                                     - mean("request_decode_time_seconds")),
        },
    }
    json.dump(result, open(args.out, "w"), indent=1)
    print(f"{'histogram':40s} {'count':>6s} {'mean ms':>9s}")
    for name, v in server.items():
        print(f"{name:40s} {v['count']:6.0f} {1e3 * v['mean_s']:9.2f}")
    print("client:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result["client"].items()})
    print("client - server (ms):", {k: round(v, 2) for k, v in result["client_minus_server_ms"].items()})
    print("identities (ms):", {k: round(v, 3) for k, v in result["identities_ms"].items()})


if __name__ == "__main__":
    main()
