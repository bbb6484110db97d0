-- wrk script: non-streaming chat completion POSTs with the client token from $BENCH_TOKEN
-- (and X-Bench-Close: 1 when $BENCH_CLOSE is 1).
-- done() prints one machine-readable line, BENCHJSON {...}, read by bench/load.py.
local token = os.getenv("BENCH_TOKEN") or "sk-none"
wrk.method = "POST"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say something."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
if os.getenv("BENCH_CLOSE") == "1" then
  -- the bench upstream answers with Connection: close: a new upstream connection per request
  wrk.headers["X-Bench-Close"] = "1"
end

local pace = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pace then
  -- a paced load (issue 18's steady small requests): each connection waits this long between requests
  function delay()
    return pace
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
