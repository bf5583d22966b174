#!/usr/bin/env python3
"""QoS 1 acknowledgement throughput with every request going through the spool
(`gateway.spool.mode: always`) against the bus path (the default), A B in the same run.

For each pair it starts a private nats-server and `fleetgate up` on it (auto-registering
devices, a fresh working directory so a fresh spool), offers one saturating QoS 1 rate with
`fleetgate-loadgen` for a step, and reads from the generator's JSON result how many
acknowledgements (PUBACKs) came per second, how many messages reached NATS (ClientData)
per second, and the gateway's CPU per million acknowledgements. The order of the two
alternates from pair to pair. The figure is the median of the per-pair ratios.

    benches/scripts/spool_ab.py --bin target/release --pairs 3 --rate 40000 --secs 10
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(admin, proc, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"fleetgate exited at start-up ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("fleetgate not ready")


def run(bindir, mode, rate, secs, devices, workdir):
    nats_port, mqtt, admin = free_port(), free_port(), free_port()
    nats = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ)
    env.pop("FLEETGATE_CONFIG", None)
    env.update({
        "FLEETGATE_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "FLEETGATE_TRANSPORTS_MQTT_LISTEN": f"127.0.0.1:{mqtt}",
        "FLEETGATE_TRANSPORTS_MQTT_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "FLEETGATE_TRANSPORTS_MQTT_MAX_NEW_CONNECTIONS_PER_ADDRESS_PER_SEC": "0",
        "FLEETGATE_TRANSPORTS_MQTT_MAX_MESSAGES_PER_SEC": "0",
        "FLEETGATE_TRANSPORTS_MQTT_MAX_BYTES_PER_SEC": "0",
        "FLEETGATE_TRANSPORTS_COAP_ENABLED": "false",
        "FLEETGATE_TRANSPORTS_HTTP_ENABLED": "false",
        "FLEETGATE_TRANSPORTS_UDP_ENABLED": "false",
        "FLEETGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
        "FLEETGATE_AUTH_AUTO_REGISTER": "true",
        "FLEETGATE_GATEWAY_SPOOL_MODE": mode,
        "RUST_LOG": "warn",
    })
    cwd = tempfile.mkdtemp(dir=workdir)
    time.sleep(0.3)
    gw = subprocess.Popen([os.path.join(bindir, "fleetgate"), "up"], env=env, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"127.0.0.1:{admin}", gw)
        out = os.path.join(cwd, "result.json")
        subprocess.run([
            os.path.join(bindir, "fleetgate-loadgen"), "--mqtt", f"127.0.0.1:{mqtt}",
            "--nats-url", f"nats://127.0.0.1:{nats_port}", "--qos", "1",
            "--devices", str(devices), "--rates", str(rate), "--step-secs", str(secs),
            "--window", "100", "--watch", f"sut={gw.pid}", "--out", out, "--quiet",
        ], check=True)
        with open(out) as f:
            step = json.load(f)["steps"][0]
        sut = next(p for p in step["processes"] if p["name"] == "sut")
        acked_rate = step["acked"] / step["seconds"]
        return {
            "acked_rate": acked_rate,
            "delivered_rate": step["delivered"] / step["seconds"],
            "cpu_s_per_m": sut["cpu_secs"] / max(step["acked"], 1) * 1e6,
        }
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        nats.terminate()
        nats.wait()
        shutil.rmtree(cwd, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release", help="directory of fleetgate and fleetgate-loadgen")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--rate", type=int, default=40000, help="offered QoS 1 rate, msg/s (above both)")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--devices", type=int, default=1000)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="spool-ab-")
    ratios = {"acked_rate": [], "cpu_s_per_m": []}
    for pair in range(args.pairs):
        order = ["fallback", "always"] if pair % 2 == 0 else ["always", "fallback"]
        got = {mode: run(args.bin, mode, args.rate, args.secs, args.devices, workdir) for mode in order}
        for mode in ["fallback", "always"]:
            r = got[mode]
            print(f"pair {pair + 1} {mode:8} acked {r['acked_rate']:8.0f}/s  delivered "
                  f"{r['delivered_rate']:8.0f}/s  gateway {r['cpu_s_per_m']:6.2f} CPU-s per million acks")
        for key in ratios:
            ratios[key].append(got["always"][key] / got["fallback"][key])
    for key, values in ratios.items():
        print(f"spool always / bus path, {key}: median {statistics.median(values):.2f}x "
              f"[{min(values):.2f}-{max(values):.2f}] over {len(values)} pairs")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
