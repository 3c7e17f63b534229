-- wrk script: POST the federated `_entities` query the gateway sends for 20
-- offers (rating + first 5 reviews with author ids), offers drawn from a
-- Zipf law over offer-000001..offer-NNNNNN (the seed's popularity law).
-- Prints one JSON line of results when done. With BENCH_CLIENTS=N, each
-- request carries `X-Forwarded-For: 10.x.y.z` for one of N clients, as a
-- trusted gateway would send it (the rate limiter then keys N clients).
local N = tonumber(os.getenv("BENCH_OFFERS") or "10000")
local CLIENTS = tonumber(os.getenv("BENCH_CLIENTS") or "0")
local PER_REQUEST, BODIES = 20, 4000
local query = "query($representations: [_Any!]!) { _entities(representations: $representations) { ... on Offer { id rating { average count distribution } reviews(first: 5) { totalCount edges { node { id rating text author { id } } } } } } }"
-- BENCH_VARIABLE=1: the same fetch as Apollo Gateway sends it when the
-- client paginates with a variable (`reviews(first: $n)`, n = 5).
local VARIABLE = os.getenv("BENCH_VARIABLE") == "1"
if VARIABLE then
  query = "query($representations: [_Any!]!, $n: Int!) { _entities(representations: $representations) { ... on Offer { id rating { average count distribution } reviews(first: $n) { totalCount edges { node { id rating text author { id } } } } } } }"
end

local cdf, total = {}, 0
for k = 1, N do total = total + 1 / k; cdf[k] = total end
local function draw()
  local u, lo, hi = math.random() * total, 1, N
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

local bodies, i = {}, 0
init = function(args)
  math.randomseed(42)
  for b = 1, BODIES do
    local reps = {}
    for r = 1, PER_REQUEST do
      reps[r] = string.format('{"__typename":"Offer","id":"offer-%06d"}', draw())
    end
    local extra = VARIABLE and ',"n":5' or ''
    bodies[b] = string.format('{"query":"%s","variables":{"representations":[%s]%s}}', query, table.concat(reps, ","), extra)
  end
end

request = function()
  i = i % BODIES + 1
  local headers = { ["content-type"] = "application/json" }
  if CLIENTS > 0 then
    local c = i % CLIENTS
    headers["x-forwarded-for"] = string.format("10.%d.%d.%d", math.floor(c / 65536) % 256, math.floor(c / 256) % 256, c % 256)
  end
  return wrk.format("POST", "/graphql", headers, bodies[i])
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"rps":%.1f,"p50_ms":%.3f,"p95_ms":%.3f,"p99_ms":%.3f,"errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000, errors))
end
