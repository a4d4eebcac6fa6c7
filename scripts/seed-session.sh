#!/usr/bin/env bash
# Replays the seed's curl session (RavenDB, "Revisions and Concurrency with E-Tags") against a gateway
# on :8080 in front of the demo backend on :3000 (start them with ./scripts/demo.sh).
set -u
run() { echo "\$ $*"; eval "$@"; echo; echo; }
run "curl -si -X PUT http://localhost:8080/docs/bobs_address -d \"{ FirstName : 'Bob', LastName: 'Smith', Address: '4 Oak Ave.' }\""
run "curl -si http://localhost:8080/docs/bobs_address"
E=$(curl -si http://localhost:8080/docs/bobs_address | grep -i '^etag' | tr -d '\r"' | awk '{print $2}')
run "curl -si --header \"If-Match:$E\" -X PUT http://localhost:8080/docs/bobs_address -d \"{ FirstName : 'Bob', LastName: 'Smith', Address: '5 Elm St.' }\""
run "curl -si --header \"If-Match:$E\" -X PUT http://localhost:8080/docs/bobs_address -d \"{ FirstName : 'Bob', LastName: 'Smith', Address: '6 Pine Rd.' }\""
run "curl -s http://127.0.0.1:3000/docs/bobs_address"
