-- wrk script for bench/run.sh: requests over a numbered family of paths, <prefix><i>.
--
--   i = START + (k * STRIDE) mod N   for the k-th request (k = 0, 1, ...)
--
-- With STRIDE = 1 and COUNT = N this visits START .. START+N-1 exactly once each, then keeps asking
-- TAIL_PATH (a document outside the family) until COUNT + TAIL responses have arrived, writes DONE_FILE
-- and stops the thread (wrk itself then waits for the SIGINT run.sh sends when DONE_FILE appears).
-- With COUNT = 0 it cycles over the N paths for wrk's -d duration; a large prime STRIDE scatters the
-- visits over the whole family (1M paths: no two consecutive requests hit neighbouring entries).
--
-- Environment (all optional):
--   BENCH_METHOD  GET (default) or PUT (body {"path":"<path>","v":1}, the document names its own path)
--   BENCH_PREFIX  default /r/
--   BENCH_N       number of paths (default 1000)
--   BENCH_START   first index (default 0)
--   BENCH_STRIDE  default 1
--   BENCH_COUNT   0 (default): run for -d; >0: fill mode as above
--   BENCH_TAIL    extra responses to wait for in fill mode (default 64, > connections)
--   BENCH_TAIL_PATH  default /docs/bench-tail
--   BENCH_DONE_FILE  file written when fill mode is done
--   BENCH_RUN_IN_PATH=1  prefix becomes <prefix><BENCH_RUN>- (run.sh sets BENCH_RUN per wrk run, so
--                    that a warm-up and the measured run never write the same paths)
-- Use with -t1: the counters live in the thread's Lua state.

local method = os.getenv("BENCH_METHOD") or "GET"
local prefix = os.getenv("BENCH_PREFIX") or "/r/"
if os.getenv("BENCH_RUN_IN_PATH") == "1" then
  prefix = prefix .. (os.getenv("BENCH_RUN") or "run") .. "-"
end
local n = tonumber(os.getenv("BENCH_N") or "1000")
local start = tonumber(os.getenv("BENCH_START") or "0")
local stride = tonumber(os.getenv("BENCH_STRIDE") or "1")
local count = tonumber(os.getenv("BENCH_COUNT") or "0")
local tail = tonumber(os.getenv("BENCH_TAIL") or "64")
local tail_path = os.getenv("BENCH_TAIL_PATH") or "/docs/bench-tail"
local done_file = os.getenv("BENCH_DONE_FILE")

local k = 0
local responses = 0
local finished = false
local put_headers = { ["Content-Type"] = "application/json" }

-- wrk calls request() once to verify the script before any connection exists (on thread 1) and
-- discards the answer: that call gets the tail path, so no index of the family is lost.
local verified = false

request = function()
  if not verified then
    verified = true
    return wrk.format("GET", tail_path)
  end
  local path
  if count > 0 and k >= count then
    path = tail_path
  else
    path = prefix .. math.floor(start + (k * stride) % n)
  end
  k = k + 1
  if method == "PUT" then
    return wrk.format("PUT", path, put_headers, '{"path":"' .. path .. '","v":1}')
  end
  return wrk.format(method, path)
end

if count > 0 then
  response = function(status, headers, body)
    responses = responses + 1
    if not finished and responses >= count + tail then
      finished = true
      if done_file then
        local f = io.open(done_file, "w")
        f:write(responses, "\n")
        f:close()
      end
      wrk.thread:stop()
    end
  end
end
