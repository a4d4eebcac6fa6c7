-- wrk script for bench/run.sh: the same PUT over and over (a static request, built once by wrk).
-- The path is wrk's URL path; extra headers (If-Match) come from wrk's -H.
--   BENCH_BODY  the body (default {"v":3}); empty: Content-Length: 0
local body = os.getenv("BENCH_BODY")
if body == nil then body = '{"v":3}' end
wrk.method = "PUT"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
