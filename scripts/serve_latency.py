"""Median latency of sequential /v1/completions requests to a running `drope serve` (the README figure)."""
import json, statistics, sys, time, urllib.request

url = sys.argv[1] + "/v1/completions"
def post(n):
    req = urllib.request.Request(url, data=json.dumps({"prompt": "the key is 4 2 7. ", "max_tokens": n}).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    r = json.loads(urllib.request.urlopen(req).read())
    return time.perf_counter() - t, r["usage"]["completion_tokens"]
post(4)
for n in (32, 128):
    ts = [post(n) for _ in range(5)]
    med = statistics.median(t for t, _ in ts)
    print(f"max_tokens={n}: {ts[0][1]} tokens, median {med * 1e3:.0f} ms, {ts[0][1] / med:.0f} tokens/s")
