-- wrk script: PUT a small JSON document to a new path on every request (/docs/<prefix>-<n>), so
-- that every request takes the whole write path (reserve, forward, settle) without conflicts.
-- Use with -t1 (one Lua state, one counter). BENCH_PREFIX keeps runs apart.
local counter = 0
local prefix = os.getenv("BENCH_PREFIX") or "w"

wrk.method = "PUT"
wrk.body = '{"n":1,"note":"store_compare"}'
wrk.headers["Content-Type"] = "application/json"

request = function()
  counter = counter + 1
  return wrk.format(nil, "/docs/" .. prefix .. "-" .. counter)
end
