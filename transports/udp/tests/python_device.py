#!/usr/bin/env python3
"""An independent FGU/1 device, written from transports/udp/SPEC.md alone (no fleetgate code).

Uses the `noiseprotocol` package (PyPI) for Noise_NK_25519_ChaChaPoly_BLAKE2s. It handshakes
with the gateway whose public key it pins, sends a 2/DCP batch to `dcx` /json with request id 1,
and waits for the RESPONSE; then sends a malformed batch with request id 2 and expects 400.
Prints one JSON line with what happened and exits 0 when both answers were as expected.

    python_device.py HOST PORT GATEWAY_PUBLIC_KEY_HEX APP_VERSION TOKEN
    python_device.py --vectors SPEC.md     checks this implementation against SPEC.md §8
"""

import json
import os
import socket
import struct
import sys

from noise.connection import Keypair, NoiseConnection

VERSION = 1
INIT, RESP, RETRY, DATA = 1, 2, 3, 4
MIN_INIT = 160                      # SPEC §4.2
F_REQUEST, F_RESPONSE, F_PUSH, F_ACK = 0x01, 0x02, 0x03, 0x04
HAS_ID, ALIAS = 0x01, 0x02


def varint(v):                      # SPEC §2: QUIC variable-length integer
    if v < 1 << 6:
        return bytes([v])
    if v < 1 << 14:
        return struct.pack(">H", 0x4000 | v)
    if v < 1 << 30:
        return struct.pack(">I", 0x80000000 | v)
    return struct.pack(">Q", 0xC000000000000000 | v)


def read_varint(b, i):
    length = 1 << (b[i] >> 6)
    v = b[i] & 0x3F
    for x in b[i + 1:i + length]:
        v = (v << 8) | x
    if i + length > len(b):
        raise ValueError("truncated varint")
    return v, i + length


def string(s):
    raw = s if isinstance(s, bytes) else s.encode()
    return varint(len(raw)) + raw


def read_bytes(b, i):
    n, i = read_varint(b, i)
    if i + n > len(b):
        raise ValueError("truncated string")
    return b[i:i + n], i + n


class Device:
    def __init__(self, addr, gateway_public, app_version, token, own=None, ephemeral=None):
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)
        self.own = own or int.from_bytes(os.urandom(4), "big") or 1
        self.noise = NoiseConnection.from_name(b"Noise_NK_25519_ChaChaPoly_BLAKE2s")
        self.noise.set_as_initiator()
        self.noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, gateway_public)
        if ephemeral:               # test vectors only
            self.noise.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        self.noise.set_prologue(b"FGU/1")
        self.noise.start_handshake()
        # Hello (SPEC §4.2): version 1, flags (bit 0: token), app version, token, zero padding.
        hello = bytes([1, 0x01]) + string(app_version) + string(token)
        header_len = 1 + 4 + 1
        pad = MIN_INIT - header_len - 48 - len(hello)
        hello += bytes(max(pad, 0))
        self.hello = hello
        self.msg1 = self.noise.write_message(hello)
        self.next_pn = 0
        self.rx_seen = set()
        self.gateway_sid = None
        self.aliases = []

    def init_packet(self, cookie=None):
        head = bytes([(VERSION << 4) | INIT]) + struct.pack(">I", self.own)
        head += bytes([16]) + cookie if cookie else bytes([0])
        return head + self.msg1

    def handshake(self):
        packet = self.init_packet()
        for _ in range(8):
            self.sock.sendto(packet, self.addr)
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            kind = data[0] & 0x0F
            if data[0] >> 4 != VERSION:
                continue
            if kind == RETRY and struct.unpack(">I", data[1:5])[0] == self.own:
                packet = self.init_packet(data[5:21])
                continue
            if kind != RESP or struct.unpack(">I", data[1:5])[0] != self.own:
                continue
            self.read_resp(data)
            return
        raise RuntimeError("no answer to the handshake")

    def read_resp(self, data):
        self.gateway_sid = struct.unpack(">I", data[5:9])[0]
        welcome = self.noise.read_message(data[9:])
        status, i = read_varint(welcome, 0)
        if status != 200:
            reason, _ = read_bytes(welcome, i)
            raise RuntimeError(f"refused: {status} {reason.decode()}")
        self.lifetime, i = read_varint(welcome, i)
        self.keepalive, i = read_varint(welcome, i)
        self.max_datagram, i = read_varint(welcome, i)
        self.server_time_ms, i = read_varint(welcome, i)
        count, i = read_varint(welcome, i)
        for _ in range(count):
            name, i = read_bytes(welcome, i)
            self.aliases.append(name.decode())
        assert self.noise.handshake_finished

    def seal(self, frames):
        # SPEC §5.1: nonce = the packet number; the Noise cipher state's nonce set explicitly.
        pn = self.next_pn
        self.next_pn += 1
        self.noise.noise_protocol.cipher_state_encrypt.set_nonce(pn)
        header = bytes([(VERSION << 4) | DATA]) + struct.pack(">IQ", self.gateway_sid, pn)
        return header + self.noise.encrypt(frames)

    def open(self, data):
        if len(data) < 29 or data[0] != (VERSION << 4) | DATA:
            return None
        receiver, pn = struct.unpack(">IQ", data[1:13])
        if receiver != self.own or pn in self.rx_seen:
            return None
        self.noise.noise_protocol.cipher_state_decrypt.set_nonce(pn)
        plain = self.noise.decrypt(data[13:])
        self.rx_seen.add(pn)
        return plain

    def ext(self, name):
        if name in self.aliases:
            return ALIAS, varint(self.aliases.index(name))
        return 0, string(name)

    def request(self, ext, path, request_id, payload):
        flag, ext_bytes = self.ext(ext)
        frame = varint(F_REQUEST) + bytes([flag | HAS_ID]) + ext_bytes + string(path)
        frame += varint(request_id) + string(payload)
        packet = self.seal(frame)
        for _ in range(4):          # SPEC §5.4: retried, each time a new packet number
            self.sock.sendto(packet, self.addr)
            try:
                while True:
                    data, _ = self.sock.recvfrom(65536)
                    answer = self.handle(self.open(data), request_id)
                    if answer is not None:
                        return answer
            except socket.timeout:
                packet = self.seal(frame)
        return None

    def handle(self, plain, request_id):
        """Reads the frames of a packet; returns (status, payload) of the answer to request_id."""
        if plain is None:
            return None
        found, acks, i = None, b"", 0
        while i < len(plain):
            kind, i = read_varint(plain, i)
            if kind == 0:
                continue
            if kind == F_RESPONSE:
                flags = plain[i]
                i += 1
                rid = None
                if flags & HAS_ID:
                    rid, i = read_varint(plain, i)
                else:
                    if flags & ALIAS:
                        _, i = read_varint(plain, i)
                    else:
                        _, i = read_bytes(plain, i)
                    _, i = read_bytes(plain, i)
                status, i = read_varint(plain, i)
                payload, i = read_bytes(plain, i)
                if rid == request_id:
                    found = (status, payload)
            elif kind == F_PUSH:
                flags = plain[i]
                i += 1
                push_id, i = read_varint(plain, i)
                if flags & ALIAS:
                    _, i = read_varint(plain, i)
                else:
                    _, i = read_bytes(plain, i)
                _, i = read_bytes(plain, i)
                _, i = read_bytes(plain, i)
                acks += varint(F_ACK) + varint(push_id)
            elif kind == 0x05:
                # A PING from the gateway (an address check after a move): answer PONG.
                acks += varint(0x06) + plain[i:i + 8]
                i += 8
            elif kind == 0x06:
                i += 8
            elif kind == 0x07:
                _, i = read_varint(plain, i)
                _, i = read_bytes(plain, i)
            else:
                break
        if acks:
            self.sock.sendto(self.seal(acks), self.addr)
        return found


def check_vectors(spec_path):
    """Recomputes SPEC.md §8 with its fixed keys; exits non-zero on the first difference."""
    text = open(spec_path).read()
    block = text.split("<!-- VECTORS-BEGIN -->")[1].split("<!-- VECTORS-END -->")[0]
    values, label = {}, None
    for line in block.splitlines():
        if line.startswith("    ") and label:
            values[label] += bytes.fromhex(line.strip())
        elif line.endswith("bytes):"):
            label = line.split(" (")[0]
            if label in values:     # the second "frames" / "DATA datagram" is the downlink
                label += " down"
            values[label] = b""
        elif ": " in line:
            key, value = line.split(": ", 1)
            values[key] = value
            label = None
    device = Device(("127.0.0.1", 9), values["gateway static public key"], "demo-v1", "tok-1",
                    own=int(values["device session id"], 16),
                    ephemeral=values["device ephemeral private key"])
    checks = [("hello payload", device.hello, values["hello payload, padded"]),
              ("INIT", device.init_packet(), values["INIT datagram"])]
    device.read_resp(values["RESP datagram"])
    checks.append(("welcome aliases", device.aliases, ["dcx", "cmx", "epts"]))
    checks.append(("gateway session id", device.gateway_sid, int(values["gateway session id"], 16)))
    flag, ext = device.ext("dcx")
    frame = varint(F_REQUEST) + bytes([flag | HAS_ID]) + ext + string("/json") + varint(1)
    frame += string(b'[{"temperature":21}]')
    checks.append(("uplink frames", frame, values["frames"]))
    checks.append(("uplink DATA", device.seal(frame), values["DATA datagram, packet number 0"]))
    down = device.open(values["DATA datagram, packet number 0 down"])
    checks.append(("downlink frames", down, values["frames down"]))
    checks.append(("downlink answer", device.handle(down, 1), (200, b"")))
    failed = [name for name, got, want in checks if got != want]
    print(json.dumps({"checked": [c[0] for c in checks], "failed": failed}))
    return 1 if failed else 0


def main():
    if sys.argv[1:2] == ["--vectors"]:
        return check_vectors(sys.argv[2])
    host, port, key_hex, app_version, token = sys.argv[1:6]
    device = Device((host, int(port)), bytes.fromhex(key_hex), app_version, token)
    device.handshake()
    ok = device.request("dcx", "/json", 1, b'[{"temperature":21},{"temperature":22}]')
    bad = device.request("dcx", "/json", 2, b"not json")
    result = {
        "aliases": device.aliases,
        "max_datagram": device.max_datagram,
        "status": ok and ok[0],
        "payload": ok and ok[1].decode(errors="replace"),
        "bad_status": bad and bad[0],
        "bad_reason": bad and bad[1].decode(errors="replace"),
    }
    print(json.dumps(result))
    return 0 if ok and ok[0] == 200 and bad and bad[0] == 400 else 1


if __name__ == "__main__":
    sys.exit(main())
