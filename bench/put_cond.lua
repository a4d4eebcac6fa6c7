-- wrk script for bench/run.sh: the conditional-write flow, every write forwarded.
--
-- BENCH_MODE=etag (the gateway): each of BENCH_DOCS documents <prefix><i> is first read with GET to
-- learn its ETag; from then on it is written with PUT If-Match: <the ETag of the previous answer>,
-- over and over (a 2xx PUT answer carries the document's new ETag). Every PUT is a conditional write
-- that passes the check, is reserved, forwarded and settled. Only the first request per document is
-- a GET (BENCH_DOCS of them per run), and a refused or failed answer sends that document back to a
-- GET.
-- BENCH_MODE=plain (nginx, the backend directly): the same PUTs with a constant If-Match, which
-- nginx forwards and the demo backend ignores.
--
-- Several connections share this Lua state, so answers are matched to documents by their body: the
-- demo backend answers a PUT with {"ok":true,"path":"<path>"}, and the documents (created by run.sh
-- directly on the backend) contain {"path":"<path>",...}. A document is queued or in flight, never
-- both, so two requests never race on one document. Use with -t1 and BENCH_DOCS > connections.

local mode = os.getenv("BENCH_MODE") or "etag"
local prefix = os.getenv("BENCH_PREFIX") or "/c/"
local docs = tonumber(os.getenv("BENCH_DOCS") or "64")

local queue = {}
local first, last = 1, 0
local function push(path, etag)
  last = last + 1
  queue[last] = { path, etag }
end
local function pop()
  if first > last then return nil end
  local item = queue[first]
  queue[first] = nil
  first = first + 1
  return item
end

for i = 0, docs - 1 do push(prefix .. i, nil) end

local put_headers = { ["Content-Type"] = "application/json", ["If-Match"] = '"plain"' }

-- wrk calls request() once to verify the script and discards the answer: keep the queue intact.
local verified = false

request = function()
  if not verified then
    verified = true
    return wrk.format("GET", prefix .. "0")
  end
  local item = pop() or { prefix .. "0", nil } -- empty queue: only after lost answers
  local path, etag = item[1], item[2]
  if mode == "etag" then
    if etag == nil then
      return wrk.format("GET", path)
    end
    put_headers["If-Match"] = etag
  end
  return wrk.format("PUT", path, put_headers, '{"path":"' .. path .. '","v":2}')
end

response = function(status, headers, body)
  local path = string.match(body or "", '"path":"([^"]*)"') or string.match(body or "", '"url":"([^"]*)"')
  if path == nil then return end
  local etag = nil
  if status >= 200 and status < 300 then
    etag = headers["ETag"] or headers["etag"] or headers["Etag"]
  end
  push(path, etag)
end
