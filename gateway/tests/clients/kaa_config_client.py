#!/usr/bin/env python3
"""A device that behaves like the official Kaa Python client's configuration handling
(kaaproject/mqtt-client-python): it never sends SUBSCRIBE, takes configuration pushes on the
bare `kp1/<app version>/cmx/<token>/config/json/status` topic, and confirms one by publishing
`{"configId", "statusCode", "reasonPhrase"}` to `.../applied/json` without a request id.

It first sends one data sample (what makes the gateway announce the endpoint connected), then
prints one JSON line per configuration pushed within --wait seconds ("none" if nothing came),
confirming each when --confirm is given. Usage:
  kaa_config_client.py HOST PORT APP_VERSION TOKEN [--confirm] [--wait SECONDS]
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    host, port, app_version, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    confirm = "--confirm" in sys.argv
    wait = float(sys.argv[sys.argv.index("--wait") + 1]) if "--wait" in sys.argv else 10.0
    base = f"kp1/{app_version}/cmx/{token}"
    pushes = []
    got = threading.Event()

    def on_message(client, _userdata, msg):
        if msg.topic != f"{base}/config/json/status":
            return
        body = json.loads(msg.payload)
        pushes.append(body)
        print(json.dumps({"topic": msg.topic, "payload": body}), flush=True)
        if confirm and body.get("configId"):
            applied = {"configId": body["configId"], "statusCode": 200, "reasonPhrase": "applied by the test client"}
            client.publish(f"{base}/applied/json", json.dumps(applied), qos=1).wait_for_publish(5)
        got.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"kaa-config-{token}-{time.time_ns()}")
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    client.publish(f"kp1/{app_version}/dcx/{token}/json", json.dumps([{"hello": 1}]), qos=1).wait_for_publish(5)
    got.wait(wait)
    # A moment for a confirmation to leave, and to see a second push if one (wrongly) follows.
    time.sleep(0.3)
    if not pushes:
        print("none", flush=True)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
