#!/usr/bin/env bash
# The end-to-end checks a new user would make by hand, as a script: ab against the clustered
# hello, kill -9 of a worker, SIGTERM and SIGKILL to the primary, crash under ab, and the
# zero-downtime operations: SIGHUP (with new-connection and keep-alive clients), SIGTTIN and
# SIGTTOU, a boot failure, a hung and a crashing handler, recycling; the default log of a
# killed worker, a taken port, and clusterctl on the control socket.
# Needs ab (Debian: apache2-utils), curl and python3. Run from the workspace root after
#   cargo build --release -p cluster-examples && cargo build --release -p cluster-net --features cli
set -u
H=target/release/hello
ms() { date +%s%3N; }
$H --workers 2 --port 0 > /tmp/acc.out 2>/tmp/acc.err & P=$!
for i in $(seq 100); do grep -q ready /tmp/acc.out && break; sleep 0.05; done
cat /tmp/acc.out; PORT=$(grep -o ':[0-9]*' /tmp/acc.out | tail -1 | tr -d :)
echo "== ab -l -c 10 -n 5000 -r"; ab -l -c 10 -n 5000 -r http://127.0.0.1:$PORT/ 2>&1 | grep -E "Complete requests|Failed requests"
for i in $(seq 10); do curl -s http://127.0.0.1:$PORT/; done | sort | uniq -c
echo "== kill -9 of a worker"
W=$(pgrep -P $P | head -1); T0=$(ms); kill -9 $W
while true; do B=$(curl -s -m 1 http://127.0.0.1:$PORT/); NP=$(echo "$B" | grep -o '[0-9]*$'); [ -n "$NP" ] && [ "$NP" != "$W" ] && pgrep -P $P | grep -qx "$NP" && [ "$(pgrep -P $P | wc -l)" = 2 ] && break; done
echo "replacement serving after $(( $(ms) - T0 )) ms (killed $W); children now: $(pgrep -P $P | tr '\n' ' ')"
sleep 0.2; echo "zombies: $(ps -eo stat,ppid | awk -v p=$P '$2==p && $1 ~ /Z/' | wc -l)"
echo "== SIGTERM to the primary"; KIDS=$(pgrep -P $P | tr '\n' ' '); T0=$(ms); kill -TERM $P; wait $P; echo "primary exit code $? after $(( $(ms) - T0 )) ms"
sleep 0.1; for k in $KIDS; do kill -0 $k 2>/dev/null && echo "worker $k survived"; done; echo "workers gone: $KIDS"
echo "== SIGKILL to the primary"
$H --workers 2 --port 0 > /tmp/acc2.out 2>/tmp/acc2.err & P=$!
for i in $(seq 100); do grep -q ready /tmp/acc2.out && break; sleep 0.05; done
KIDS=$(pgrep -P $P | tr '\n' ' '); T0=$(ms); kill -9 $P
for k in $KIDS; do while kill -0 $k 2>/dev/null && [ "$(ps -o stat= -p $k | cut -c1)" != Z ]; do sleep 0.01; done; done
echo "idle workers $KIDS gone $(( $(ms) - T0 )) ms after the primary's SIGKILL"
echo "== crash --workers 2 under ab -l -c 4 -n 500 -r"
target/release/crash --workers 2 --port 0 > /tmp/acc3.out 2>/tmp/acc3.err & P=$!
for i in $(seq 100); do grep -q ready /tmp/acc3.out && break; sleep 0.05; done
PORT=$(grep -o ':[0-9]*' /tmp/acc3.out | tail -1 | tr -d :)
ab -l -c 4 -n 500 -r http://127.0.0.1:$PORT/ 2>&1 | grep -E "Complete requests|Failed requests"
kill -TERM $P; wait $P

# ----- zero-downtime operations -----
children() { pgrep -P $1 | wc -l; }
start() { $H --port 0 "$@" > /tmp/acc4.out 2>/tmp/acc4.err & P=$!
  for i in $(seq 100); do grep -q ready /tmp/acc4.out && break; sleep 0.05; done
  PORT=$(grep -o ':[0-9]*' /tmp/acc4.out | tail -1 | tr -d :); }
stop() { kill -TERM $P; wait $P; echo "primary exit code $?"; }
under_ab() { # ab flags, then the signals to send one second apart
  local flags=$1; shift
  ab $flags -r http://127.0.0.1:$PORT/ > /tmp/acc4.ab 2>&1 & local A=$!
  sleep 1; for s in "$@"; do kill -$s $P; sleep 1; echo "after $s: $(children $P) workers"; done
  wait $A; grep -E "Complete requests|Failed requests|Keep-Alive requests" /tmp/acc4.ab; }
echo "== SIGHUP to hello --workers 4 under ab -c 16 (a new connection per request)"
start --workers 4; OLD=$(pgrep -P $P | tr '\n' ' ')
under_ab "-q -c 16 -n 60000" HUP
for k in $OLD; do kill -0 $k 2>/dev/null && echo "old worker $k still running"; done
grep -E "rolling restart (started|finished)" /tmp/acc4.err | cut -c1-120; stop
echo "== SIGHUP under 16 keep-alive clients (ab -k)"
start --workers 4; under_ab "-q -k -c 16 -n 200000" HUP
grep -E "rolling restart (started|finished)" /tmp/acc4.err | cut -c1-120; stop
echo "== SIGTTIN, SIGTTOU, SIGTTOU under load: 5, 4, 3 workers"
start --workers 4; under_ab "-q -c 16 -n 60000" TTIN TTOU TTOU; stop
echo "== hello --workers 2 --boot-fail"
T0=$(ms); $H --workers 2 --port 0 --boot-fail > /dev/null 2>/tmp/acc5.err; echo "exit code $? after $(( $(ms) - T0 )) ms"; grep "^hello:" /tmp/acc5.err
echo "== hello --faults --hang-timeout 3: GET /hang, then load"
start --workers 2 --faults --hang-timeout 3; T0=$(ms)
curl -s -m 30 -o /dev/null -w "GET /hang: http %{http_code}\n" http://127.0.0.1:$PORT/hang & C=$!
sleep 0.5; ab -q -c 4 -n 20000 -r http://127.0.0.1:$PORT/ 2>&1 | grep -E "Complete requests|Failed requests"
grep -E "worker hung" /tmp/acc4.err | cut -c1-200; wait $C
echo "== GET /crash under load"
ab -q -c 4 -n 20000 -r http://127.0.0.1:$PORT/ > /tmp/acc4.ab 2>&1 & A=$!
sleep 0.3; curl -s -o /dev/null -w "GET /crash: http %{http_code}\n" http://127.0.0.1:$PORT/crash; wait $A
grep -E "Complete requests|Failed requests" /tmp/acc4.ab; stop
echo "== --max-requests 1000 under ab -c 16 -n 30000"
start --workers 4 --max-requests 1000; under_ab "-q -c 16 -n 30000"
echo "workers recycled: $(grep -c 'recycling worker' /tmp/acc4.err)"; stop

# ----- operate and observe -----
echo "== kill -9 of a worker, at the default log level (no RUST_LOG)"
H="env -u RUST_LOG target/release/hello"; start --workers 2; W=$(pgrep -P $P | head -1); kill -9 $W; sleep 0.5
grep -E "pid=$W .*SIGKILL|respawning|worker started" /tmp/acc4.err | tail -3 | cut -c1-160; stop
echo "== hello on a taken port"
python3 -c 'import socket,time; s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)' > /tmp/acc6.port & S=$!
for i in $(seq 100); do [ -s /tmp/acc6.port ] && break; sleep 0.05; done
T0=$(ms); $H --workers 2 --port $(cat /tmp/acc6.port) > /dev/null 2>/tmp/acc6.err; echo "exit code $? after $(( $(ms) - T0 )) ms"
echo "'in use' printed $(grep -oi 'in use' /tmp/acc6.err | wc -l) time(s): $(tail -1 /tmp/acc6.err)"; kill $S
echo "== clusterctl on hello --control, under ab"
CTL=target/release/clusterctl; SOCK=/tmp/acc7.sock; rm -f $SOCK
start --workers 2 --control $SOCK; ls -l $SOCK | cut -c1-10
ab -q -c 8 -n 40000 -r http://127.0.0.1:$PORT/ > /tmp/acc7.ab 2>&1 & A=$!
$CTL --socket $SOCK status; $CTL --socket $SOCK scale 3; sleep 0.5; echo "children: $(children $P)"
printf 'garbage\n' | python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"garbage\n"); print("garbage ->", s.recv(500).decode().strip())' $SOCK
$CTL --socket $SOCK reload; echo "reload exit code $?"
$CTL --socket $SOCK metrics | grep -E "^cluster_(connections_(accepted|acked)_total|workers) "
su nobody -s /bin/sh -c "$CTL --socket $SOCK status" 2>&1 | head -1
wait $A; grep -E "Complete requests|Failed requests" /tmp/acc7.ab; stop
