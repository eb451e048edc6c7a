-- wrk script: replay pre-signed cardsvc POST requests (online taps), each one once.
--
--   wrk -t T -c C -d D --latency -s loadtests/replay_post.lua URL -- REQUESTS_FILE T
--
-- REQUESTS_FILE has one request per line, tab-separated:
--   path  terminal  key_id  timestamp  nonce  signature  json_body
-- Thread k of T sends lines k, k+T, ... (no two threads share a nonce or a terminal sequence number). A
-- thread that runs out of lines starts again: those replays are refused (401) and counted as non-2xx.

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
      local path, terminal, key_id, timestamp, nonce, signature, body =
        line:match("^(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\t(%S+)\t(.+)$")
      requests[#requests + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/json",
        ["X-Cardsvc-Terminal"] = terminal,
        ["X-Cardsvc-Key-Id"] = key_id,
        ["X-Cardsvc-Timestamp"] = timestamp,
        ["X-Cardsvc-Nonce"] = nonce,
        ["X-Cardsvc-Signature"] = signature,
      }, body)
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

-- Count business answers: approved vs declined, from the JSON body.
local approved = 0
local declined = 0

function response(status, headers, body)
  if status == 200 then
    if body:find('"result":"approved"', 1, true) then
      approved = approved + 1
    else
      declined = declined + 1
    end
  end
end

function done(summary, latency, requests)
  io.write(string.format("replay_post: sent=%d\n", summary.requests))
end
