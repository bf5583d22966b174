# A/B of the load generator's own CPU per message: two fleetgate-loadgen builds (paths in
# LOADGEN_BEFORE and LOADGEN_AFTER), alternating A B / B A, each against one Mosquitto on port
# 18883, 200 devices, two 4 s steps, one runtime thread; CPU (user + system) of the generator
# process from getrusage. Usage: python3 loadgen_cost_ab.py QOS RATE PAIRS
import json, os, resource, subprocess, sys, statistics, time
qos, rate, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3])
port = "18883"
mosq = subprocess.Popen(["mosquitto", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
res = {"before": [], "after": []}
try:
    for p in range(pairs):
        order = ["before", "after"] if p % 2 == 0 else ["after", "before"]
        for name in order:
            out = f"{os.environ.get('TMPDIR', '/tmp')}/loadgen-ab-{name}-{p}.json"
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([os.environ.get(f"LOADGEN_{name.upper()}", f"/tmp/lg/loadgen-{name}"), "--target", "broker", "--mqtt", f"127.0.0.1:{port}",
                            "--devices", "200", "--rates", f"{rate},{rate}", "--step-secs", "4", "--qos", qos,
                            "--threads", "1", "--quiet", "--out", out], check=True, stdout=subprocess.DEVNULL)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            rep = json.load(open(out))
            sent = rep["totals"]["sent"]
            res[name].append(cpu * 1e6 / sent)
            print(f"pair {p} {name}: {cpu:.2f} cpu-s, sent {sent}, delivered {rep['totals']['delivered']}, {cpu*1e6/sent:.2f} cpu-us/msg", flush=True)
finally:
    mosq.terminate(); mosq.wait()
b, a = statistics.median(res["before"]), statistics.median(res["after"])
ratios = [x / y for x, y in zip(res["after"], res["before"])]
print(f"median before {b:.2f} us/msg, after {a:.2f} us/msg, after/before {a/b:.3f}; per-pair ratios {[round(r,3) for r in ratios]}")
