-- wrk script: replay pre-signed cardsvc requests, each one once (every request carries its own nonce).
--
--   wrk -t T -c C -d D --latency -s loadtests/replay.lua URL -- REQUESTS_FILE T
--
-- REQUESTS_FILE has one request per line, tab-separated:
--   method  path  terminal  key_id  timestamp  nonce  signature
-- Thread k of T sends lines k, k+T, k+2T, ... so no two threads send the same nonce. A thread that runs
-- out of lines starts again from its first one: those replays are refused (401), which shows up as
-- "Non-2xx or 3xx responses" and makes the benchmark fail, as it should.

local next_id = 0

function setup(thread)
  thread:set("thread_index", next_id)
  next_id = next_id + 1
end

local requests = {}
local position = 0

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open " .. tostring(args[1]))
  local threads = tonumber(args[2]) or 1
  local index = 0
  for line in file:lines() do
    if index % threads == thread_index then
      local method, path, terminal, key_id, timestamp, nonce, signature =
        line:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)$")
      requests[#requests + 1] = wrk.format(method, path, {
        ["X-Cardsvc-Terminal"] = terminal,
        ["X-Cardsvc-Key-Id"] = key_id,
        ["X-Cardsvc-Timestamp"] = timestamp,
        ["X-Cardsvc-Nonce"] = nonce,
        ["X-Cardsvc-Signature"] = signature,
      })
    end
    index = index + 1
  end
  file:close()
  assert(#requests > 0, "no requests for this thread")
end

function request()
  position = position + 1
  if position > #requests then
    position = 1
  end
  return requests[position]
end
