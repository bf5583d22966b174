#!/bin/sh
# Usage: benches/scripts/config_push.sh DEVICES (from the repository root; BIN=target/release for a release build) — nats-server and fleetgate (debug build) on core 0, the devices on core 1.
set -e
N=${1:-10000}
BIN=$(realpath ${BIN:-target/debug})
NATS_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
MQTT_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
ADMIN_PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
DIR=$(mktemp -d)
taskset -c 0 nats-server -a 127.0.0.1 -p $NATS_PORT > $DIR/nats.log 2>&1 &
NATS=$!
sleep 0.5
cd $DIR
FLEETGATE_NATS_URL=nats://127.0.0.1:$NATS_PORT \
FLEETGATE_AUTH_AUTO_REGISTER=true \
FLEETGATE_GATEWAY_APP_VERSIONS='[demo-v1]' \
FLEETGATE_GATEWAY_EXTENSIONS='[dcx, cmx]' \
FLEETGATE_TRANSPORTS_MQTT_LISTEN=127.0.0.1:$MQTT_PORT \
FLEETGATE_TRANSPORTS_MQTT_MAX_CONNECTIONS_PER_ADDRESS=0 FLEETGATE_TRANSPORTS_MQTT_MAX_NEW_CONNECTIONS_PER_ADDRESS_PER_SEC=0 \
FLEETGATE_TRANSPORTS_MQTT_MAX_MESSAGES_PER_SEC=0 FLEETGATE_TRANSPORTS_MQTT_MAX_BYTES_PER_SEC=0 \
FLEETGATE_TRANSPORTS_COAP_ENABLED=false FLEETGATE_TRANSPORTS_HTTP_ENABLED=false \
FLEETGATE_ADMIN_LISTEN=127.0.0.1:$ADMIN_PORT \
FLEETGATE_LOG_FILTER=warn \
taskset -c 0 $BIN/fleetgate up > $DIR/fleetgate.log 2>&1 &
FG=$!
for i in $(seq 1 100); do curl -sf 127.0.0.1:$ADMIN_PORT/readyz >/dev/null && break; sleep 0.1; done
taskset -c 1 $BIN/fleetgate-config-push --mqtt 127.0.0.1:$MQTT_PORT --admin 127.0.0.1:$ADMIN_PORT \
  --nats-url nats://127.0.0.1:$NATS_PORT --devices $N || true
cat /proc/$FG/stat | awk "{print \"utime+stime ticks:\", \$14+\$15}"; ps -o rss= -p $FG | sed 's/^/fleetgate rss_kb cputime: /'
kill $FG; sleep 1; kill $NATS
