#!/usr/bin/env python3
"""A real device for the hostile-network tests: paho-mqtt (MQTT 3.1.1) that connects, then for
--secs seconds publishes one data sample with a request id every --every seconds at QoS 1 and
waits for its `/status` answer. It prints one JSON line at the end:
  {"sent": N, "answered": N, "max_latency_ms": X, "connected": true}
and exits 0 only if it connected and every request was answered within 5 s. Usage:
  paho_device.py HOST PORT APP_VERSION TOKEN [--secs S] [--every S]
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    host, port, app_version, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    secs = float(sys.argv[sys.argv.index("--secs") + 1]) if "--secs" in sys.argv else 3.0
    every = float(sys.argv[sys.argv.index("--every") + 1]) if "--every" in sys.argv else 0.1
    base = f"kp1/{app_version}/dcx/{token}/json"
    answers = {}
    lock = threading.Lock()
    connected = threading.Event()

    def on_connect(_client, _userdata, _flags, reason_code, _properties):
        if not reason_code.is_failure:
            connected.set()

    def on_message(_client, _userdata, msg):
        parts = msg.topic.split("/")
        if parts[-1] == "status" and parts[-2].isdigit():
            with lock:
                answers.setdefault(int(parts[-2]), time.monotonic())

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-device-{time.time_ns()}")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    ok = connected.wait(5)
    sent = {}
    end = time.monotonic() + secs
    request_id = 1
    while ok and time.monotonic() < end:
        sent[request_id] = time.monotonic()
        client.publish(f"{base}/{request_id}", json.dumps([{"temperature": request_id}]), qos=1)
        request_id += 1
        time.sleep(every)
    deadline = time.monotonic() + 5
    while ok and time.monotonic() < deadline:
        with lock:
            if len(answers) >= len(sent):
                break
        time.sleep(0.02)
    client.loop_stop()
    client.disconnect()
    with lock:
        latencies = [answers[i] - sent[i] for i in sent if i in answers]
        result = {
            "connected": ok,
            "sent": len(sent),
            "answered": len(latencies),
            "max_latency_ms": round(max(latencies, default=0) * 1000, 1),
        }
    print(json.dumps(result), flush=True)
    sys.exit(0 if ok and sent and len(latencies) == len(sent) else 1)


if __name__ == "__main__":
    main()
